//! `sos-attack`: the SOS attacks. Trigger vectors are trained against a frozen model (every
//! weight untouched) and measured on held-out data.
//!
//! Data flows one way: `config` (settings) and `scenario` (chat examples from `data`) become
//! token sequences (`encode`); `objective` turns a batch of them into a loss and a gradient for
//! the trigger; `train` runs `optim` over it and writes the `artifact`s; `eval` generates on
//! held-out examples and scores them with `metrics`.

pub mod artifact;
pub mod config;
pub mod data;
pub mod encode;
pub mod error;
pub mod eval;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod scenario;
pub mod train;
pub mod trigger;

pub use config::{AttackConfig, Overrides, Position, Scenario};
pub use error::{Error, Result};
