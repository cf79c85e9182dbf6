//! `sos manifest create|verify`: provenance, as an OpenSSF model-signing v1.0 statement.
//! `verify` exits 0 when every digest matches, 1 on any mismatch, 2 when it could not run.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use sos_audit::manifest::{create_with, verify_with, Serialization};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Hash {
    Sha256,
}

#[derive(Subcommand, Debug)]
pub enum ManifestCmd {
    /// Hash a model (a folder or one file) into a manifest.
    Create {
        path: PathBuf,
        /// The manifest to write (JSON).
        #[arg(long)]
        out: PathBuf,
        /// Where the model came from (a URL, a build id): recorded in the manifest.
        #[arg(long)]
        source: Option<String>,
        #[arg(long, value_enum, default_value = "sha256")]
        hash: Hash,
        /// Hash every file in shards of this many bytes (model-signing's `shards` method).
        #[arg(long)]
        shard_size: Option<u64>,
    },
    /// Hash a model and sign the manifest with an ECDSA P-256 key (PEM): a Sigstore bundle that
    /// `model_signing verify key --public_key PUB.pem` accepts.
    Sign {
        path: PathBuf,
        /// The private key (PKCS#8 or SEC1 PEM, as `openssl ecparam -name prime256v1 -genkey` writes).
        #[arg(long)]
        key: PathBuf,
        /// The bundle to write (JSON).
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        source: Option<String>,
        #[arg(long)]
        shard_size: Option<u64>,
    },
    /// Check a model against a manifest or a signed bundle: exit 0 verified, 1 mismatch, 2 could
    /// not run (a bad signature included).
    Verify {
        path: PathBuf,
        manifest: PathBuf,
        /// The signer's public key (PEM), for a signed bundle.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the command; returns whether verification failed.
pub fn run(c: ManifestCmd) -> Result<bool> {
    match c {
        ManifestCmd::Create { path, out, source, hash: Hash::Sha256, shard_size } => {
            let ser = serialization(shard_size)?;
            let st = with_bar(|p| create_with(&path, ser, source.as_deref(), Some(&out), p))?;
            let text = serde_json::to_string_pretty(&st)? + "\n";
            sos_model::fsutil::write_atomic(&out, |f| f.write_all(text.as_bytes())).with_context(|| format!("cannot write {}", out.display()))?;
            let n = st["predicate"]["resources"].as_array().map_or(0, Vec::len);
            println!("wrote {} ({n} resources; subject {} sha256:{})", out.display(), st["subject"][0]["name"].as_str().unwrap_or(""), st["subject"][0]["digest"]["sha256"].as_str().unwrap_or(""));
            Ok(false)
        }
        ManifestCmd::Sign { path, key, out, source, shard_size } => {
            let ser = serialization(shard_size)?;
            let st = with_bar(|p| create_with(&path, ser, source.as_deref(), Some(&out), p))?;
            let bundle = sos_audit::signature::sign(&st, &key)?;
            let text = serde_json::to_string(&bundle)?;
            sos_model::fsutil::write_atomic(&out, |f| f.write_all(text.as_bytes())).with_context(|| format!("cannot write {}", out.display()))?;
            println!("wrote {} (signed; subject {} sha256:{})", out.display(), st["subject"][0]["name"].as_str().unwrap_or(""), st["subject"][0]["digest"]["sha256"].as_str().unwrap_or(""));
            Ok(false)
        }
        ManifestCmd::Verify { path, manifest, key, json } => {
            let v = with_bar(|p| verify_with(&path, &manifest, key.as_deref(), p))?;
            if json {
                println!("{}", serde_json::json!({"verified": v.ok(), "changed": v.changed, "missing": v.missing, "unlisted": v.unlisted, "changed_tensors": v.changed_tensors, "added_tensors": v.added_tensors, "subject_mismatch": v.subject_mismatch}));
            } else {
                for (what, list) in [("changed", &v.changed), ("missing", &v.missing), ("not in the manifest", &v.unlisted), ("changed tensor", &v.changed_tensors), ("added tensor", &v.added_tensors)] {
                    for x in list {
                        println!("{what}: {x}");
                    }
                }
                if v.subject_mismatch {
                    println!("the subject digest does not match the listed resources");
                }
                println!("{}", if v.ok() { "verified" } else { "MISMATCH" });
            }
            std::io::stdout().flush()?;
            Ok(!v.ok())
        }
    }
}

/// Runs `f` with a byte progress bar on stderr (hidden when stderr is not a terminal, and
/// drawn only once hashing takes a while).
fn with_bar<T>(f: impl FnOnce(sos_audit::manifest::Progress) -> Result<T, sos_audit::Error>) -> Result<T> {
    let bar = ProgressBar::hidden();
    bar.set_style(ProgressStyle::with_template("hashing [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})").expect("valid template").progress_chars("=> "));
    let start = std::time::Instant::now();
    let shown = std::sync::atomic::AtomicBool::new(false);
    let r = f(&|done, total| {
        if !shown.load(std::sync::atomic::Ordering::Relaxed) && start.elapsed() > std::time::Duration::from_millis(500) && !shown.swap(true, std::sync::atomic::Ordering::Relaxed) {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    Ok(r?)
}

fn serialization(shard_size: Option<u64>) -> Result<Serialization> {
    Ok(match shard_size {
        Some(0) => anyhow::bail!("--shard-size must be positive"),
        Some(s) => Serialization::Shards(s),
        None => Serialization::Files,
    })
}
