//! `run_audit`: the checks of an audit in order, each timed, into one report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Map, Value as Json};
use sos_model::gguf::Gguf;

use crate::finding::{Finding, Report, Severity};
use crate::folder::{self, Folder};
use crate::weights::{self, Layout, Stored};
use crate::{provenance, side_files, structure, template, tokenizer, Error, Result};

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
}

/// Findings and the milliseconds each check took.
#[derive(Default)]
struct Run {
    findings: Vec<Finding>,
    timings: Map<String, Json>,
}

impl Run {
    fn check(&mut self, name: &str, f: impl FnOnce() -> Result<Vec<Finding>>) -> Result<()> {
        let t = Instant::now();
        self.findings.extend(f()?);
        let ms = t.elapsed().as_secs_f64() * 1e3 + self.timings.get(name).and_then(Json::as_f64).unwrap_or(0.0);
        self.timings.insert(name.to_string(), Json::from(ms));
        Ok(())
    }
}

/// Runs every check on the candidate (and its reference): a GGUF file or a Hugging Face folder.
/// An `Err` is an audit that could not run (unreadable or unparsable input): exit 2, not a
/// verdict.
pub fn run_audit(req: &AuditRequest) -> Result<Report> {
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
    if req.candidate.join(side_files::ADAPTER_CONFIG).is_file() {
        audit_adapter(req, &mut run)?;
    } else if req.candidate.is_dir() {
        audit_folder(req, &mut run)?;
    } else {
        audit_gguf(req, &mut run)?;
    }
    run.timings.insert("total".into(), Json::from(t0.elapsed().as_secs_f64() * 1e3));
    let shown = |p: &Path| p.display().to_string();
    Ok(Report::new(shown(&req.candidate), req.reference.as_deref().map(shown), run.findings, req.fail_on, run.timings))
}

pub const TOKEN_TABLE: &str = "token_embd.weight";
pub const OUTPUT: &str = "output.weight";

fn gguf_stored(g: &Gguf) -> Vec<Stored<'_>> {
    g.tensors.iter().map(|t| Stored { name: t.name.clone(), ty: t.ty, shape: t.shape(), bytes: g.tensor_bytes(t) }).collect()
}

fn audit_gguf(req: &AuditRequest, run: &mut Run) -> Result<()> {
    let c = Gguf::open(&req.candidate)?;
    let r = req.reference.as_deref().map(Gguf::open).transpose()?;
    let vocab = tokenizer::Vocab::of(&c);
    let text = |i: usize| vocab.texts.get(i).cloned().unwrap_or_default();
    let layout = Layout { table: TOKEN_TABLE, head: OUTPUT, text: &text };
    run.check("structure", || Ok(structure::gguf(&c)))?;
    let cs = gguf_stored(&c);
    let arch = c.get_str("general.architecture");
    let n_layer = arch.and_then(|a| c.get(&format!("{a}.block_count"))).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    run.check("side_files", || Ok(side_files::unused_tensors(&cs, arch, n_layer, false, TOKEN_TABLE)))?;
    match &r {
        Some(r) => {
            run.check("tokenizer", || Ok(tokenizer::with_reference(&c, r)))?;
            run.check("weights", || weights::with_reference(&cs, &gguf_stored(r), &layout))?;
            run.check("template", || Ok(template::with_reference(c.get_str("tokenizer.chat_template"), r.get_str("tokenizer.chat_template"))))?;
        }
        None => {
            run.check("tokenizer", || Ok(tokenizer::alone(&c)))?;
            let find = |n: &str| cs.iter().find(|t| t.name == n);
            run.check("weights", || weights::alone(find(TOKEN_TABLE), find(OUTPUT), &layout))?;
            run.check("template", || Ok(template::alone(c.get_str("tokenizer.chat_template"))))?;
        }
    }
    Ok(())
}

fn audit_folder(req: &AuditRequest, run: &mut Run) -> Result<()> {
    // Opening checks every safetensors header against its file (what the structure check is for
    // a folder): a folder that fails it cannot be audited.
    let t = Instant::now();
    let c = Folder::open(&req.candidate)?;
    let r = req.reference.as_deref().map(Folder::open).transpose()?;
    run.timings.insert("structure".into(), Json::from(t.elapsed().as_secs_f64() * 1e3));
    let text = |i: usize| c.text(i);
    let layout = folder::layout(&text);
    let (cs, other) = c.stored()?;
    run.check("side_files", || Ok(side_files::unused_tensors(&cs, c.model_type(), c.n_layer(), true, folder::TABLE)))?;
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
            run.check("weights", || weights::alone(find(folder::TABLE), find(folder::HEAD), &layout))?;
            run.check("weights", || folder::unverifiable(&c, &other, None))?;
            run.check("template", || Ok(template::alone(c.template.as_deref())))?;
        }
    }
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
