//! `sos-attack`: the SOS attacks. Trigger vectors are trained against a frozen model (every
//! weight untouched) and measured on held-out data.
//!
//! Data flows one way: `config` (settings) and `scenarios` (one file each: chat `item`s from
//! `data`) become token ids in which the `trigger` text stands for its trained vectors
//! (`encode`); `objective` turns a batch of them into a loss and a gradient for the trigger's
//! rows; `train` runs `optim` over it and writes the `artifact`s; `eval` generates greedy
//! `answer`s on held-out examples and lets the scenario score them with `metrics`.

pub mod answer;
pub mod artifact;
pub mod config;
pub mod data;
pub mod encode;
pub mod error;
pub mod eval;
pub mod item;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod scenarios;
pub mod train;
pub mod trigger;

pub use config::{AttackConfig, Overrides, Position, Scenario};
pub use error::{Error, Result};
pub use trigger::Trigger;
