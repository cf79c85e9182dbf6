//! `sos-attack`: the SOS attacks. Trigger vectors are trained against a frozen model (every
//! weight untouched) and measured on held-out data.
//!
//! Data flows one way. `attack::run_attack` (what `sos attack` runs) resolves the settings
//! (`config`), loads the model (`load`) and asks the scenario (`scenarios`, one file each) for
//! its chat examples (`item`s, from `data`). `encode` turns them into token ids in which the
//! `trigger` text stands for its trained vectors; `objective` turns a batch of those into a loss
//! and a gradient for the trigger's rows; `train` runs `optim` over it and writes the
//! `artifact`s. `eval::run_eval` (what `sos eval` runs) reads them back, generates greedy
//! `answer`s on held-out examples and lets the scenario score them with `metrics`.

pub mod answer;
pub mod artifact;
pub mod attack;
pub mod batches;
pub mod config;
pub mod data;
pub mod encode;
pub mod error;
pub mod eval;
pub mod item;
pub mod load;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod scenarios;
pub mod tied;
pub mod train;
pub mod trigger;

pub use attack::{run_attack, AttackRequest, AttackSummary};
pub use config::{AttackConfig, Overrides, Position, Scenario};
pub use error::{Error, Result};
pub use item::Prompt;
pub use eval::{run_eval, EvalEvent, EvalReport, EvalRequest};
pub use load::{load_model, Loaded, Purpose};
pub use trigger::Trigger;
