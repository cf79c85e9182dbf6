//! Provenance: a manifest of a model's files, in the OpenSSF model-signing v1.0 payload format
//! (an in-toto Statement v1 whose predicate lists every file, or file shard, with its digest),
//! and its verification. Files are read in 1 MiB chunks (memory flat in the file size) and
//! hashed in parallel across the cores; SHA-256 runs on the CPU's SHA extensions where it has
//! them (the `sha2` crate detects them at run time).
//!
//! Compatible with model-signing 1.1.1's payload: resources sorted by path component by
//! component (Python's `PurePath` order), shards named `path:start:end` with algorithm
//! `sha256-sharded-<size>`, a single-file model's one resource named `.`, the subject digest the
//! SHA-256 of the resources' raw digests in order, git files ignored. sos adds a predicate field
//! of its own, `sos` (source, tool version, per-tensor digests of GGUF and safetensors files),
//! which v1.0 verifiers ignore.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://model_signing/signature/v1.0";
/// What model-signing ignores by default (git metadata).
pub const GIT_PATHS: &[&str] = &[".git", ".gitattributes", ".github", ".gitignore"];
const CHUNK: usize = 1 << 20;

/// How the model is cut into hashed resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serialization {
    Files,
    /// Every file in shards of this many bytes.
    Shards(u64),
}

/// One hashed resource: a file (`path`), or a shard (`path:start:end`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub name: String,
    pub algorithm: String,
    pub digest: [u8; 32],
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes a hex string spells, if it is one.
fn unhex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if b.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16);
    b.chunks_exact(2).map(|p| Some((digit(p[0])? * 16 + digit(p[1])?) as u8)).collect()
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::File { path: path.to_path_buf(), msg: format!("cannot read: {e}") }
}

/// The plain files under `root` (or `root` itself), relative, minus ignored ones; symbolic links
/// are refused (model-signing's default).
fn list(root: &Path, ignore: &[String]) -> Result<Vec<PathBuf>> {
    let meta = std::fs::symlink_metadata(root).map_err(|e| io_err(root, e))?;
    if meta.file_type().is_symlink() {
        return Err(Error::File { path: root.to_path_buf(), msg: "is a symbolic link (not followed)".into() });
    }
    if meta.is_file() {
        return Ok(vec![PathBuf::from(".")]);
    }
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for e in std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))? {
            let e = e.map_err(|e| io_err(&dir, e))?;
            let r = rel.join(e.file_name());
            if ignore.iter().any(|i| r.starts_with(i)) {
                continue;
            }
            let t = e.file_type().map_err(|er| io_err(&e.path(), er))?;
            if t.is_symlink() {
                return Err(Error::File { path: e.path(), msg: "is a symbolic link (not followed)".into() });
            }
            if t.is_dir() {
                stack.push(r);
            } else if t.is_file() {
                out.push(r);
            }
        }
    }
    Ok(out)
}

/// Python's `PurePath` order: component by component.
fn path_key(p: &Path) -> Vec<String> {
    p.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect()
}

/// Told `(bytes hashed, bytes to hash)` as hashing advances, from any of the hashing threads.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// SHA-256 of the whole file at `path`, read in 1 MiB chunks (what `sos bench hash` measures).
pub fn sha256_file(path: &Path) -> Result<[u8; 32]> {
    let size = std::fs::metadata(path).map_err(|e| io_err(path, e))?.len();
    hash_range(path, 0, size, &|_| {})
}

/// SHA-256 of bytes `start..end` of `path`, read in chunks; `read(n)` after each.
fn hash_range(path: &Path, start: u64, end: u64, read: &dyn Fn(u64)) -> Result<[u8; 32]> {
    let mut f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(start)).map_err(|e| io_err(path, e))?;
    let mut h = Sha256::new();
    let mut left = end - start;
    let mut buf = vec![0u8; CHUNK];
    while left > 0 {
        let n = (left as usize).min(CHUNK);
        f.read_exact(&mut buf[..n]).map_err(|e| io_err(path, e))?;
        h.update(&buf[..n]);
        left -= n as u64;
        read(n as u64);
    }
    Ok(h.finalize().into())
}

/// Shards one hashing may make at most.
const MAX_SHARDS: u64 = 1 << 20;

/// Hashes the model at `root` into resources, in model-signing's order, using every core.
pub fn hash_model(root: &Path, ser: Serialization, ignore: &[String], progress: Progress) -> Result<Vec<Resource>> {
    hash_files(root, &list(root, ignore)?, ser, progress)
}

/// Hashes `files` (relative to `root`, as `list` gives them) into resources, in model-signing's
/// order.
fn hash_files(root: &Path, files: &[PathBuf], ser: Serialization, progress: Progress) -> Result<Vec<Resource>> {
    let mut files = files.to_vec();
    files.sort_by_key(|p| path_key(p));
    // (file, start, end, name, algorithm) jobs.
    let mut jobs = Vec::new();
    for rel in &files {
        let full = if rel == Path::new(".") { root.to_path_buf() } else { root.join(rel) };
        let size = std::fs::metadata(&full).map_err(|e| io_err(&full, e))?.len();
        let name = rel.to_string_lossy().replace('\\', "/");
        match ser {
            Serialization::Files => jobs.push((full, 0, size, name, "sha256".to_string())),
            Serialization::Shards(s) => {
                // A manifest sets the shard size; one of 1 byte would make a job per byte.
                if size / s.max(1) + jobs.len() as u64 > MAX_SHARDS {
                    return Err(Error::File { path: full, msg: format!("shards of {s} bytes would make over {MAX_SHARDS} pieces of {size} bytes (model-signing's default shard is 1 GB)") });
                }
                let mut start = 0;
                while start < size {
                    let end = (start + s).min(size);
                    jobs.push((full.clone(), start, end, format!("{name}:{start}:{end}"), format!("sha256-sharded-{s}")));
                    start = end;
                }
            }
        }
    }
    let total: u64 = jobs.iter().map(|j| j.2 - j.1).sum();
    let done = std::sync::atomic::AtomicU64::new(0);
    let read = |n: u64| progress(done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n, total);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(jobs.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut digests: Vec<Option<Result<[u8; 32]>>> = (0..jobs.len()).map(|_| None).collect();
    let slots: Vec<std::sync::Mutex<&mut Option<Result<[u8; 32]>>>> = digests.iter_mut().map(std::sync::Mutex::new).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((path, start, end, _, _)) = jobs.get(i) else { break };
                **slots[i].lock().expect("no panics while held") = Some(hash_range(path, *start, *end, &read));
            });
        }
    });
    drop(slots);
    jobs.into_iter()
        .zip(digests)
        .map(|((_, _, _, name, algorithm), d)| Ok(Resource { name, algorithm, digest: d.expect("every job ran")? }))
        .collect()
}

/// The model's name as model-signing takes it: the folder's or the file's name.
fn model_name(root: &Path) -> String {
    root.canonicalize().ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_else(|| root.display().to_string())
}

/// SHA-256 over the resources' raw digests, in order: the statement's subject digest.
pub fn root_digest(rs: &[Resource]) -> String {
    let mut h = Sha256::new();
    for r in rs {
        h.update(r.digest);
    }
    hex(&h.finalize())
}

/// Per-tensor SHA-256 of every GGUF and safetensors file among `rs` (by file, then tensor
/// name): which tensor changed, not only which file.
fn tensor_digests(root: &Path, files: &[String]) -> Result<Json> {
    let mut out = BTreeMap::new();
    for f in files {
        let full = if f == "." { root.to_path_buf() } else { root.join(f) };
        let mut t = BTreeMap::new();
        if f.ends_with(".gguf") || (f == "." && root.extension().is_some_and(|e| e == "gguf")) {
            let g = sos_model::gguf::Gguf::open(&full)?;
            for ti in &g.tensors {
                t.insert(ti.name.clone(), sos_model::fsutil::sha256_hex(g.tensor_bytes(ti)));
            }
        } else if f.ends_with(".safetensors") {
            let file = std::fs::File::open(&full).map_err(|e| io_err(&full, e))?;
            // SAFETY: a read-only map of a file this process only reads.
            let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(&full, e))?;
            sos_model::safetensors::check_safetensors(&full, &bytes)?;
            let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::File { path: full.clone(), msg: format!("invalid safetensors file: {e}") })?;
            for (name, v) in st.tensors() {
                t.insert(name, sos_model::fsutil::sha256_hex(v.data()));
            }
        } else {
            continue;
        }
        out.insert(f.clone(), t);
    }
    Ok(serde_json::to_value(out).expect("maps of strings"))
}

/// The in-toto statement for the model at `root`. `written` is where the statement will be
/// written: inside the model folder it is ignored, as model-signing ignores its signature file.
pub fn create(root: &Path, ser: Serialization, source: Option<&str>, written: Option<&Path>) -> Result<Json> {
    create_with(root, ser, source, written, &|_, _| {})
}

/// `create`, telling `progress` how far the file hashes are.
pub fn create_with(root: &Path, ser: Serialization, source: Option<&str>, written: Option<&Path>, progress: Progress) -> Result<Json> {
    let mut ignore: Vec<String> = GIT_PATHS.iter().map(|s| s.to_string()).collect();
    let inside = |w: &Path| -> Option<String> {
        let (r, w) = (root.canonicalize().ok()?, w.parent()?.canonicalize().ok()?.join(w.file_name()?));
        w.strip_prefix(&r).ok().map(|p| p.to_string_lossy().replace('\\', "/"))
    };
    if let Some(rel) = written.and_then(inside).filter(|r| !r.is_empty()) {
        ignore.push(rel);
    }
    // The per-tensor digests read the weights a second time: beside the file hashes, on another
    // core, rather than after them.
    let files = list(root, &ignore)?;
    let names: Vec<String> = files.iter().map(|p| p.to_string_lossy().replace('\\', "/")).collect();
    let (rs, tensors) = std::thread::scope(|s| {
        let t = s.spawn(|| tensor_digests(root, &names));
        (hash_files(root, &files, ser, progress), t.join().expect("tensor digests do not panic"))
    });
    let (rs, tensors) = (rs?, tensors?);
    let mut serialization = json!({"method": "files", "hash_type": "sha256", "allow_symlinks": false, "ignore_paths": ignore});
    if let Serialization::Shards(s) = ser {
        serialization["method"] = "shards".into();
        serialization["shard_size"] = s.into();
    }
    Ok(json!({
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model_name(root), "digest": {"sha256": root_digest(&rs)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": serialization,
            "resources": rs.iter().map(|r| json!({"name": r.name, "algorithm": r.algorithm, "digest": hex(&r.digest)})).collect::<Vec<_>>(),
            "sos": {"source": source, "tool": format!("sos {}", env!("CARGO_PKG_VERSION")), "tensors": tensors},
        },
    }))
}

/// What `verify` found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Verification {
    /// Resources whose digest differs.
    pub changed: Vec<String>,
    /// Resources the manifest lists that the model lacks.
    pub missing: Vec<String>,
    /// Files of the model the manifest does not list.
    pub unlisted: Vec<String>,
    /// Tensors whose per-tensor digest differs (from sos's predicate field, when present).
    pub changed_tensors: Vec<String>,
    /// Tensors of a listed file that the manifest's per-tensor digests do not have.
    pub added_tensors: Vec<String>,
    /// The subject digest does not match the listed resources.
    pub subject_mismatch: bool,
}

impl Verification {
    pub fn ok(&self) -> bool {
        self.changed.is_empty() && self.missing.is_empty() && self.unlisted.is_empty() && !self.subject_mismatch
    }
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::File { path: path.to_path_buf(), msg: msg.into() }
}

/// Checks the model at `root` against the statement in `manifest_path`: a statement as `create`
/// writes it, or a signed bundle (`sos manifest sign`, `model_signing sign key`), whose
/// signature must verify with `key` first. The model is hashed as the statement says.
pub fn verify(root: &Path, manifest_path: &Path, key: Option<&Path>) -> Result<Verification> {
    verify_with(root, manifest_path, key, &|_, _| {})
}

/// `verify`, telling `progress` how far the hashes are.
pub fn verify_with(root: &Path, manifest_path: &Path, key: Option<&Path>, progress: Progress) -> Result<Verification> {
    let text = std::fs::read_to_string(manifest_path).map_err(|e| io_err(manifest_path, e))?;
    let doc: Json = serde_json::from_str(&text).map_err(|e| bad(manifest_path, format!("invalid JSON: {e}")))?;
    let st = match (crate::signature::is_bundle(&doc), key) {
        (true, Some(k)) => crate::signature::open(&doc, manifest_path, k)?,
        (true, None) => return Err(bad(manifest_path, "a signed bundle: give the signer's public key with --key PUB.pem")),
        (false, _) => doc,
    };
    if st["_type"] != STATEMENT_TYPE || st["predicateType"] != PREDICATE_TYPE {
        return Err(bad(manifest_path, format!("not a model-signing v1.0 statement (_type {}, predicateType {})", st["_type"], st["predicateType"])));
    }
    let p = &st["predicate"];
    let ser = &p["serialization"];
    if ser["hash_type"] != "sha256" {
        return Err(bad(manifest_path, format!("hash_type {}: sos verifies sha256 manifests", ser["hash_type"])));
    }
    let method = match ser["method"].as_str() {
        Some("files") => Serialization::Files,
        Some("shards") => Serialization::Shards(ser["shard_size"].as_u64().filter(|&s| s > 0).ok_or_else(|| bad(manifest_path, "shards without a positive shard_size"))?),
        m => return Err(bad(manifest_path, format!("serialization method {m:?}: expected files or shards"))),
    };
    let ignore: Vec<String> = ser["ignore_paths"].as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(|s| s.trim_end_matches('/').to_string())).collect()).unwrap_or_default();
    let listed: BTreeMap<String, String> = p["resources"]
        .as_array()
        .ok_or_else(|| bad(manifest_path, "no predicate.resources list"))?
        .iter()
        .map(|r| Some((r["name"].as_str()?.to_string(), r["digest"].as_str()?.to_string())))
        .collect::<Option<_>>()
        .ok_or_else(|| bad(manifest_path, "a resource without name or digest"))?;
    let mut v = Verification::default();
    // The subject digest over the listed digests, in the order listed.
    let mut h = Sha256::new();
    for r in p["resources"].as_array().into_iter().flatten() {
        let d = r["digest"].as_str().unwrap_or("");
        h.update(unhex(d).ok_or_else(|| bad(manifest_path, format!("digest {d:?} is not hex")))?);
    }
    v.subject_mismatch = st["subject"][0]["digest"]["sha256"].as_str() != Some(hex(&h.finalize()).as_str());
    let actual = hash_model(root, method, &ignore, progress)?;
    let actual: BTreeMap<String, String> = actual.into_iter().map(|r| (r.name, hex(&r.digest))).collect();
    for (name, d) in &listed {
        match actual.get(name) {
            None => v.missing.push(name.clone()),
            Some(a) if a != d => v.changed.push(name.clone()),
            _ => {}
        }
    }
    v.unlisted = actual.keys().filter(|n| !listed.contains_key(*n)).cloned().collect();
    if let Some(tensors) = p["sos"]["tensors"].as_object().filter(|_| !v.changed.is_empty()) {
        // Only files that were hashed and changed: the names are the manifest's, and a path it
        // made up (absolute, `..`, a FIFO) must not be opened.
        let file_of = |n: &str| match method {
            Serialization::Shards(_) => n.rsplitn(3, ':').nth(2).unwrap_or(n).to_string(),
            Serialization::Files => n.to_string(),
        };
        let changed: std::collections::BTreeSet<String> = v.changed.iter().map(|n| file_of(n)).collect();
        let tensors: BTreeMap<&String, &Json> = tensors.iter().filter(|(f, _)| changed.contains(*f)).collect();
        let now = tensor_digests(root, &tensors.keys().map(|f| f.to_string()).collect::<Vec<_>>())?;
        for (file, ts) in tensors {
            for (t, d) in ts.as_object().into_iter().flatten() {
                if now[file.as_str()][t] != *d {
                    v.changed_tensors.push(format!("{file}: {t}"));
                }
            }
            for t in now[file.as_str()].as_object().into_iter().flatten().map(|(t, _)| t).filter(|t| ts.get(*t).is_none()) {
                v.added_tensors.push(format!("{file}: {t}"));
            }
        }
    }
    Ok(v)
}
