//! `run_audit`: the checks of an audit in order, each timed, into one report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Map, Value as Json};
use sos_model::gguf::Gguf;

use crate::finding::{Finding, Severity};
use crate::report::Report;
use crate::folder::{self, Folder};
use crate::behavior::endpoint::{Endpoint, EndpointConfig};
use crate::behavior::local::Local;
use crate::behavior::{self, Level, Runner};
use crate::weights::{self, Layout, RowStats, Stored};
use crate::isolation::{self, Isolation};
use crate::{provenance, side_files, structure, template, tokenizer, Error, Result};
use sos_model::{Exec, LoadOptions, LoadedModel};

/// What `sos audit` was asked.
pub struct AuditRequest {
    pub candidate: PathBuf,
    pub reference: Option<PathBuf>,
    /// For a PEFT adapter: the base model it applies to (default: the adapter's
    /// `base_model_name_or_path`, when that is a local path).
    pub base: Option<PathBuf>,
    /// A manifest (`sos manifest create`, model-signing's payload) to check the files against.
    pub manifest: Option<PathBuf>,
    /// The public key a signed manifest must verify with.
    pub key: Option<PathBuf>,
    /// Findings at or above this make the verdict `fail`.
    pub fail_on: Severity,
    pub behavior: Behavior,
    /// Run the behaviour tests through this server instead of our runtime (the candidates still
    /// come from the CANDIDATE file).
    pub endpoint: Option<EndpointConfig>,
    /// Without a reference, search the token table for rows alone as no trained token is
    /// (`isolation`: an exact nearest-row search, seconds on 2 cores) even when no behaviour
    /// tests run. It runs anyway whenever they do (its rows are what they probe): see `deep`.
    pub deep: bool,
}

/// Whether behaviour tests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    Off,
    /// `quick` when our runtime can run the model, else off (the report says why).
    Auto,
    On(Level),
}

/// Findings and the milliseconds each check took.
#[derive(Default)]
struct Run {
    findings: Vec<Finding>,
    timings: Map<String, Json>,
    rows: Option<RowStats>,
    isolation: Option<Isolation>,
}

impl Run {
    fn check(&mut self, name: &str, f: impl FnOnce() -> Result<Vec<Finding>>) -> Result<()> {
        let t = Instant::now();
        self.findings.extend(f()?);
        let ms = t.elapsed().as_secs_f64() * 1e3 + self.timings.get(name).and_then(Json::as_f64).unwrap_or(0.0);
        self.timings.insert(name.to_string(), Json::from(ms));
        Ok(())
    }

    /// The search for rows alone in the token table (timed as `isolation`).
    fn isolated(&mut self, table: Option<&Stored>, l: &Layout, progress: &mut dyn FnMut(Phase, usize, usize)) -> Result<()> {
        let Some(t) = table.filter(|t| t.shape.len() == 2 && crate::ranges::supported(t.ty)) else { return Ok(()) };
        let mut found = None;
        self.check("isolation", || {
            let iso = isolation::isolated(t, l.ordinary, &mut |d, n| progress(Phase::NearestRows, d, n))?;
            let f = isolation::finding(&iso, l);
            found = Some(iso);
            Ok(f.into_iter().collect())
        })?;
        self.isolation = found;
        Ok(())
    }
}

/// Runs every check on the candidate (and its reference): a GGUF file or a Hugging Face folder.
/// An `Err` is an audit that could not run (unreadable or unparsable input): exit 2, not a
/// verdict.
pub fn run_audit(req: &AuditRequest) -> Result<Report> {
    run_audit_with(req, &mut |_, _, _| {})
}

/// What a long audit is busy with, for `run_audit_with`'s progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The nearest-row search: block pairs done of all.
    NearestRows,
    /// Behaviour tests: answers done of all.
    Behavior,
}

/// `run_audit`, with `progress(phase, done, total)` called as the long phases advance.
pub fn run_audit_with(req: &AuditRequest, progress: &mut dyn FnMut(Phase, usize, usize)) -> Result<Report> {
    let t0 = Instant::now();
    for p in std::iter::once(&req.candidate).chain(&req.reference) {
        if !p.exists() {
            return Err(Error::File { path: p.clone(), msg: "no such file".into() });
        }
    }
    if let Some(r) = &req.reference {
        if r.is_dir() != req.candidate.is_dir() {
            return Err(Error::Invalid(format!("{} and {} are not the same kind (a GGUF file and a folder): compare like with like", req.candidate.display(), r.display())));
        }
    }
    let mut run = Run::default();
    if let Some(m) = &req.manifest {
        run.check("provenance", || provenance::check(&req.candidate, m, req.key.as_deref()))?;
    }
    let adapter = req.candidate.join(side_files::ADAPTER_CONFIG).is_file();
    if adapter {
        audit_adapter(req, &mut run)?;
    } else if req.candidate.is_dir() {
        audit_folder(req, &mut run, progress)?;
    } else {
        audit_gguf(req, &mut run, progress)?;
    }
    let (summary, note) = behave(req, adapter, &mut run, &mut |d, t| progress(Phase::Behavior, d, t))?;
    run.timings.insert("total".into(), Json::from(t0.elapsed().as_secs_f64() * 1e3));
    let shown = |p: &Path| p.display().to_string();
    let mut report = Report::new(shown(&req.candidate), req.reference.as_deref().map(shown), run.findings, req.fail_on, run.timings);
    report.rows = run.rows;
    report.isolation = run.isolation;
    report.behavior = summary;
    report.behavior_note = note;
    Ok(report)
}

/// Weights over this size are not run under `--behavior auto`: a quick behaviour audit of
/// Qwen2.5-Coder-1.5B (1.1 GB, Q4_K_M) takes a minute on 2 cores; a 7B file would take several.
const AUTO_MAX_BYTES: u64 = 2 << 30;

/// Whether the nearest-row search runs (the callers look only when there is no reference): when
/// asked, or when behaviour tests will run (under `auto`: through a server, or on our runtime
/// when the model is `runnable` there and small enough), since the rows it names are candidates
/// they probe and nothing else names norm-matched rows in a table without an output-layer
/// signature.
fn deep(req: &AuditRequest, runnable: bool) -> bool {
    req.deep
        || match req.behavior {
            Behavior::Off => false,
            Behavior::On(_) => true,
            Behavior::Auto => req.endpoint.is_some() || (runnable && weights_bytes(&req.candidate) <= AUTO_MAX_BYTES),
        }
}

/// Bytes of a GGUF file, or of a folder's files.
fn weights_bytes(p: &Path) -> u64 {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    if p.is_dir() {
        std::fs::read_dir(p).map(|d| d.flatten().map(|e| size(&e.path())).sum()).unwrap_or(0)
    } else {
        size(p)
    }
}

/// The behaviour tests, when asked and possible: the candidate (and the reference) loaded on
/// our runtime with weights kept quantized, probed with the tokens the static checks flagged.
fn behave(req: &AuditRequest, adapter: bool, run: &mut Run, progress: &mut dyn FnMut(usize, usize)) -> Result<(Option<behavior::Summary>, Option<String>)> {
    let level = match req.behavior {
        Behavior::Off => return Ok((None, None)),
        Behavior::Auto => Level::Quick,
        Behavior::On(l) => l,
    };
    let asked = req.behavior != Behavior::Auto;
    if adapter {
        let why = "behaviour tests do not run on a PEFT adapter yet: apply it (`sos import-peft`) and audit the model";
        return if asked { Err(Error::Invalid(format!("{}: {why}", req.candidate.display()))) } else { Ok((None, Some(why.into()))) };
    }
    if !asked && req.endpoint.is_none() {
        let size = weights_bytes(&req.candidate);
        if size > AUTO_MAX_BYTES {
            return Ok((None, Some(format!("behaviour tests skipped under --behavior auto: {:.1} GB of weights is over {} GB for our CPU runtime; run them with --behavior quick, or through a server with --endpoint", size as f64 / 1e9, AUTO_MAX_BYTES >> 30))));
        }
    }
    let opts = LoadOptions { exec: Exec::Quant, ..LoadOptions::default() };
    let t = Instant::now();
    let reference = req.reference.as_deref().map(|r| LoadedModel::open(r, &opts)).transpose();
    let reference = match reference {
        Ok(r) => r.filter(|r| r.template.is_some()),
        Err(_) if !asked => None,
        Err(e) => return Err(e.into()),
    };
    // The largest rows, then (when the nearest-row search ran) the loneliest.
    let mut anomalous: Vec<u32> = run.rows.as_ref().map(|r| r.largest.iter().map(|&(i, _)| i).collect()).unwrap_or_default();
    anomalous.extend(run.isolation.iter().flat_map(|iso| iso.loneliest.iter().map(|r| r.id)));
    let (found, summary) = if let Some(cfg) = &req.endpoint {
        // The server runs the model; the file gives the candidates and their texts.
        let endpoint = Endpoint::new(cfg.clone())?;
        let (tok, template) = LoadedModel::open_text(&req.candidate, None)?;
        let cands = behavior::candidates(&run.findings, &tok, level, &anomalous)?;
        behavior::run(&mut Runner::Endpoint { endpoint: &endpoint, runs: 0, template, logprobs: None }, reference.as_ref(), &cands, level, progress)?
    } else {
        let lm = match LoadedModel::open(&req.candidate, &opts) {
            Ok(lm) if lm.template.is_some() => lm,
            Ok(_) if !asked => return Ok((None, Some("behaviour tests skipped: the model has no chat template".into()))),
            Err(e) if !asked => return Ok((None, Some(format!("behaviour tests skipped: our runtime cannot run this model ({e})")))),
            Ok(_) => return Err(Error::Invalid(format!("{}: no chat template, which behaviour tests need", req.candidate.display()))),
            Err(e) => return Err(e.into()),
        };
        let cands = behavior::candidates(&run.findings, &lm.tokenizer, level, &anomalous)?;
        match behavior::run(&mut Runner::Local(Local::new(&lm)), reference.as_ref(), &cands, level, progress) {
            Ok(r) => r,
            // Not asked for: a model our runtime loads but cannot converse with (a template that
            // fails on ordinary messages, a context too short for the prompts) keeps its static
            // report.
            Err(e) if !asked => return Ok((None, Some(format!("behaviour tests stopped: {e}")))),
            Err(e) => return Err(e),
        }
    };
    run.findings.extend(found);
    run.timings.insert("behavior".into(), Json::from(t.elapsed().as_secs_f64() * 1e3));
    Ok((Some(summary), None))
}

pub const TOKEN_TABLE: &str = "token_embd.weight";
pub const OUTPUT: &str = "output.weight";

fn gguf_stored(g: &Gguf) -> Vec<Stored<'_>> {
    g.tensors.iter().map(|t| Stored { name: t.name.clone(), ty: t.ty, shape: t.shape(), bytes: g.tensor_bytes(t) }).collect()
}

fn audit_gguf(req: &AuditRequest, run: &mut Run, progress: &mut dyn FnMut(Phase, usize, usize)) -> Result<()> {
    let c = Gguf::open(&req.candidate)?;
    let r = req.reference.as_deref().map(Gguf::open).transpose()?;
    let vocab = tokenizer::Vocab::of(&c);
    let text = |i: usize| vocab.texts.get(i).cloned().unwrap_or_default();
    let ordinary = |i: usize| vocab.ty(i) == tokenizer::NORMAL && vocab.texts.get(i).is_some_and(|t| t.chars().count() > 1);
    let layout = Layout { table: TOKEN_TABLE, head: OUTPUT, text: &text, ordinary: &ordinary };
    run.check("structure", || Ok(structure::gguf(&c)))?;
    let cs = gguf_stored(&c);
    let arch = c.get_str("general.architecture");
    let n_layer = arch.and_then(|a| c.get(&format!("{a}.block_count"))).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    run.check("side_files", || Ok(side_files::unused_tensors(&cs, arch, n_layer, false, TOKEN_TABLE)))?;
    let run_rows = weights::row_stats(cs.iter().find(|t| t.name == TOKEN_TABLE), &layout)?;
    match &r {
        Some(r) => {
            run.check("tokenizer", || Ok(tokenizer::with_reference(&c, r)))?;
            run.check("weights", || weights::with_reference(&cs, &gguf_stored(r), &layout))?;
            run.check("template", || Ok(template::with_reference(c.get_str("tokenizer.chat_template"), r.get_str("tokenizer.chat_template"))))?;
        }
        None => {
            run.check("tokenizer", || Ok(tokenizer::alone(&c)))?;
            let find = |n: &str| cs.iter().find(|t| t.name == n);
            run.check("weights", || weights::alone(find(TOKEN_TABLE), find(OUTPUT), run_rows.as_ref(), &layout))?;
            // Runnable: a configuration our runtime reads and a chat template (what `auto` needs).
            let runnable = sos_model::Config::from_gguf(&c).is_ok() && c.get_str("tokenizer.chat_template").is_some();
            if deep(req, runnable) {
                run.isolated(find(TOKEN_TABLE), &layout, progress)?;
            }
            run.check("template", || Ok(template::alone(c.get_str("tokenizer.chat_template"))))?;
        }
    }
    run.rows = run_rows;
    Ok(())
}

fn audit_folder(req: &AuditRequest, run: &mut Run, progress: &mut dyn FnMut(Phase, usize, usize)) -> Result<()> {
    // Opening checks every safetensors header against its file (what the structure check is for
    // a folder): a folder that fails it cannot be audited.
    let t = Instant::now();
    let c = Folder::open(&req.candidate)?;
    let r = req.reference.as_deref().map(Folder::open).transpose()?;
    run.timings.insert("structure".into(), Json::from(t.elapsed().as_secs_f64() * 1e3));
    let text = |i: usize| c.text(i);
    let ordinary = |i: usize| c.is_ordinary(i);
    let layout = folder::layout(&text, &ordinary);
    let (cs, other) = c.stored()?;
    run.check("side_files", || Ok(side_files::unused_tensors(&cs, c.model_type(), c.n_layer(), true, folder::TABLE)))?;
    let run_rows = weights::row_stats(cs.iter().find(|t| t.name == folder::TABLE), &layout)?;
    match &r {
        Some(r) => {
            run.check("tokenizer", || Ok(folder::tokenizer_with_reference(&c, r)))?;
            let (rs, _) = r.stored()?;
            run.check("weights", || weights::with_reference(&cs, &rs, &layout))?;
            run.check("weights", || folder::unverifiable(&c, &other, Some(r)))?;
            run.check("template", || Ok(template::with_reference(c.template.as_deref(), r.template.as_deref())))?;
        }
        None => {
            run.check("tokenizer", || Ok(folder::tokenizer_alone(&c)))?;
            let find = |n: &str| cs.iter().find(|t| t.name == n);
            run.check("weights", || weights::alone(find(folder::TABLE), find(folder::HEAD), run_rows.as_ref(), &layout))?;
            let runnable = sos_model::Config::from_hf_json(&c.path.join("config.json"), true).is_ok() && c.template.is_some();
            if deep(req, runnable) {
                run.isolated(find(folder::TABLE), &layout, progress)?;
            }
            run.check("weights", || folder::unverifiable(&c, &other, None))?;
            run.check("template", || Ok(template::alone(c.template.as_deref())))?;
        }
    }
    run.rows = run_rows;
    run.check("side_files", || side_files::pickles(&req.candidate))
}

/// A PEFT adapter folder, against the token table of its base model.
fn audit_adapter(req: &AuditRequest, run: &mut Run) -> Result<()> {
    if req.reference.is_some() {
        return Err(Error::Invalid(format!("{}: an adapter is audited against its base model (--base), not a --reference", req.candidate.display())));
    }
    let cfg_path = req.candidate.join(side_files::ADAPTER_CONFIG);
    let base = match &req.base {
        Some(b) => b.clone(),
        None => {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::File { path: cfg_path.clone(), msg: format!("cannot read: {e}") })?;
            let named = serde_json::from_str::<Json>(&text).ok().and_then(|c| c["base_model_name_or_path"].as_str().map(PathBuf::from));
            match named {
                Some(p) if p.exists() => p,
                _ => return Err(Error::Invalid(format!("{}: a PEFT adapter; name its base model with --base (a GGUF file or a Hugging Face folder)", req.candidate.display()))),
            }
        }
    };
    if !base.exists() {
        return Err(Error::File { path: base, msg: "no such file".into() });
    }
    if base.is_dir() {
        let f = Folder::open(&base)?;
        let (stored, _) = f.stored()?;
        let t = stored.iter().find(|t| t.name == folder::TABLE).ok_or_else(|| Error::File { path: base.clone(), msg: format!("no `{}`", folder::TABLE) })?;
        let table = side_files::Table::of(t)?;
        run.check("side_files", || side_files::adapter(&req.candidate, &table, &|i| f.text(i)))?;
    } else {
        let g = Gguf::open(&base)?;
        let vocab = tokenizer::Vocab::of(&g);
        let stored = gguf_stored(&g);
        let t = stored.iter().find(|t| t.name == TOKEN_TABLE).ok_or_else(|| Error::File { path: base.clone(), msg: format!("no `{TOKEN_TABLE}`") })?;
        let table = side_files::Table::of(t)?;
        run.check("side_files", || side_files::adapter(&req.candidate, &table, &|i| vocab.texts.get(i).cloned().unwrap_or_default()))?;
    }
    run.check("side_files", || side_files::pickles(&req.candidate))
}
