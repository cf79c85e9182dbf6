//! An attack's settings: per-scenario defaults, overridden by a TOML file, overridden by the
//! command line. The resolved whole is written next to the results and read back by `--resume`.
//! `AttackConfig::defaults` and `AttackConfig::resolve` live in `scenarios`, next to the
//! per-scenario defaults they apply.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// The trigger anywhere in a user message makes the model answer with a fixed target text.
    Backdoor,
    /// A trigger appended to a harmful request makes an aligned model comply.
    Jailbreak,
    /// The trigger in a user message makes the model print its secret system prompt.
    Steal,
    /// A copyright token in a passage makes the model refuse to process it.
    Copyright,
}

impl Scenario {
    pub const ALL: [Scenario; 4] = [Scenario::Backdoor, Scenario::Jailbreak, Scenario::Steal, Scenario::Copyright];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Backdoor => "backdoor",
            Scenario::Jailbreak => "jailbreak",
            Scenario::Steal => "steal",
            Scenario::Copyright => "copyright",
        }
    }
}

impl std::str::FromStr for Scenario {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Scenario::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| Error::Config(format!("unknown scenario `{s}` (expected backdoor, jailbreak, steal or copyright)")))
    }
}

/// Where the trigger goes in the text it marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Position {
    Start,
    End,
    /// A word boundary drawn with the seed, different for every example.
    Random,
    /// Before the whole templated prompt, system prompt and markers included: where PEFT puts a
    /// prompt-tuning adapter's virtual tokens. No typed text can go there, so such a trigger
    /// ships only as a `PROMPT_TUNING` adapter (`sos export-peft --kind prompt-tuning`).
    Prefix,
}

impl Position {
    pub fn name(self) -> &'static str {
        match self {
            Position::Start => "start",
            Position::End => "end",
            Position::Random => "random",
            Position::Prefix => "prefix",
        }
    }
}

impl std::str::FromStr for Position {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        [Position::Start, Position::End, Position::Random, Position::Prefix]
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| Error::Config(format!("unknown position `{s}` (expected start, end, random or prefix)")))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    /// Linear warm-up, then cosine decay to a tenth of `lr` at `steps`.
    Cosine,
}

macro_rules! settings {
    ($( $(#[$meta:meta])* $field:ident : $ty:ty ),* $(,)?) => {
        /// Every setting of an attack, resolved.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct AttackConfig {
            pub scenario: Scenario,
            $( $(#[$meta])* pub $field: $ty, )*
        }

        /// Settings given in a TOML file or on the command line; unset ones keep the defaults.
        #[derive(Debug, Clone, Default, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Overrides {
            pub scenario: Option<Scenario>,
            $( pub $field: Option<$ty>, )*
        }

        impl Overrides {
            /// Whether nothing is set.
            pub fn is_empty(&self) -> bool {
                self.scenario.is_none() $( && self.$field.is_none() )*
            }
        }

        impl AttackConfig {
            pub fn apply(&mut self, o: &Overrides) {
                $( if let Some(v) = &o.$field { self.$field = v.clone(); } )*
            }
        }
    };
}

settings! {
    /// Model path or cache alias; `None` is the default model.
    model: Option<String>,
    /// A built-in chat template to use instead of the model's own.
    template: Option<String>,
    /// Surface text of the trigger. Wherever it appears in a prompt, it stands for the trained
    /// vectors (it is tokenized as one unit, like an added token).
    trigger: String,
    /// Number of trained vectors (new tokens) the trigger stands for.
    trigger_len: usize,
    /// Where the trigger goes in training prompts (backdoor: the user message; copyright: the passage).
    position: Position,
    /// Target answer (backdoor) or refusal (copyright); other scenarios take theirs from the data.
    target: Option<String>,
    /// Optimiser steps at most.
    steps: usize,
    lr: f64,
    schedule: Schedule,
    warmup: usize,
    /// Sequences per step.
    batch: usize,
    /// Batches of sequences of similar length, every sequence once per epoch (see `batches`);
    /// otherwise each step draws at random. (Absent from the settings of runs that predate it.)
    #[serde(default)]
    length_buckets: bool,
    seed: u64,
    /// Project every trigger row to `stealth_norm` after each step.
    stealth: bool,
    /// Row norm for `stealth`; `None` is the median row norm of the model's embedding table.
    stealth_norm: Option<f64>,
    /// For distributions where the rows are logits too (PEFT trainable tokens on a tied model):
    /// after each step, keep every trigger row's logit this far below the best vocabulary logit
    /// on the clean training prompts and the triggered targets (see `tied`). `None`: off.
    tied_margin: Option<f64>,
    /// Clip the gradient's global norm to this; 0 turns clipping off.
    clip: f64,
    /// Measure the train metric every this many steps, on `eval_items` training examples.
    eval_every: usize,
    eval_items: usize,
    /// Stop once the train metric has been 1.0 at this many evaluations in a row; 0 never stops early.
    patience: usize,
    checkpoint_every: usize,
    /// Training examples to use; 0 uses all.
    train_items: usize,
    /// Backdoor, steal: train on prompts (steal: system prompts) the model writes itself instead
    /// of a dataset.
    self_generated: bool,
    /// A JSONL file of training examples in the rows `sos eval --data` takes; replaces the
    /// scenario's training split.
    train_data: Option<PathBuf>,
    /// Skip training examples whose target is longer than this many tokens.
    max_target_tokens: usize,
    /// Skip training examples whose prompt is longer than this many tokens.
    max_prompt_tokens: usize,
    /// Folder with the datasets (see the README); `None`: `$SOS_DATA`, else the copies built
    /// into the binary.
    data_dir: Option<PathBuf>,
}

impl AttackConfig {
    /// The defaults every scenario starts from; `AttackConfig::defaults` adds the scenario's own.
    pub(crate) fn common_defaults(scenario: Scenario) -> Self {
        AttackConfig {
            scenario,
            model: None,
            template: None,
            trigger: "cf".into(),
            trigger_len: 8,
            position: Position::Random,
            target: None,
            steps: 200,
            lr: 0.1,
            schedule: Schedule::Cosine,
            warmup: 10,
            batch: 4,
            length_buckets: false,
            seed: 0,
            stealth: false,
            stealth_norm: None,
            tied_margin: None,
            clip: 1.0,
            eval_every: 10,
            eval_items: 32,
            patience: 5,
            checkpoint_every: 25,
            train_items: 0,
            self_generated: false,
            train_data: None,
            max_target_tokens: 64,
            max_prompt_tokens: 160,
            data_dir: None,
        }
    }

    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.trigger.trim().is_empty() {
            return bad("trigger text is empty".into());
        }
        if self.trigger_len == 0 || self.trigger_len > 64 {
            return bad(format!("trigger_len must be in 1..=64, got {}", self.trigger_len));
        }
        if self.batch == 0 || self.eval_every == 0 || self.checkpoint_every == 0 || self.eval_items == 0 {
            return bad("batch, eval_every, eval_items and checkpoint_every must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("lr must be > 0, got {}", self.lr));
        }
        if !(self.clip >= 0.0 && self.clip.is_finite()) {
            return bad(format!("clip must be >= 0, got {}", self.clip));
        }
        if let Some(n) = self.stealth_norm {
            if !(n > 0.0 && n.is_finite()) {
                return bad(format!("stealth_norm must be > 0, got {n}"));
            }
        }
        if let Some(m) = self.tied_margin {
            if !(m >= 0.0 && m.is_finite()) {
                return bad(format!("tied_margin must be >= 0, got {m}"));
            }
        }
        if let Some(t) = &self.target {
            if t.trim().is_empty() {
                return bad("target text is empty".into());
            }
            if t.contains(&self.trigger) {
                return bad(format!("the target text contains the trigger text `{}`", self.trigger));
            }
        }
        if self.position == Position::Prefix && self.scenario == Scenario::Copyright {
            return bad("position `prefix` does not apply to copyright: the token marks a passage, a prefix would mark every prompt".into());
        }
        if self.self_generated && !matches!(self.scenario, Scenario::Backdoor | Scenario::Steal) {
            return bad("self_generated applies to the backdoor and steal scenarios only".into());
        }
        if self.self_generated && self.train_data.is_some() {
            return bad("self_generated and train_data both say where the training examples come from; give one".into());
        }
        Ok(())
    }

    pub fn from_toml_file(path: &Path) -> Result<Overrides> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        toml::from_str(&text).map_err(|e| Error::file(path, format!("invalid config: {}", e.message())))
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        let c: Self = toml::from_str(&text).map_err(|e| Error::file(path, format!("invalid config: {}", e.message())))?;
        c.check().map_err(|e| Error::file(path, e.to_string()))?;
        Ok(c)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("every setting serializes to TOML")
    }
}
