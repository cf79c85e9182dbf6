//! Signed manifests in model-signing's key mode: the statement as the payload of a DSSE envelope
//! signed with ECDSA P-256 / SHA-256, in a Sigstore bundle (v0.3, no transparency log entry; the
//! key is named by the SHA-256 of its PEM, as model-signing names it). Keyless Sigstore signing
//! needs the network and is not done here.

use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{DerSignature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey, LineEnding};
use serde_json::{json, Value as Json};

use crate::{Error, Result};

pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::File { path: path.to_path_buf(), msg: msg.into() }
}

/// DSSE's pre-authentication encoding of a payload: what is signed.
fn pae(payload: &[u8]) -> Vec<u8> {
    let mut v = format!("DSSEv1 {} {PAYLOAD_TYPE} {} ", PAYLOAD_TYPE.len(), payload.len()).into_bytes();
    v.extend_from_slice(payload);
    v
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| bad(path, format!("cannot read: {e}")))
}

/// A private key from PEM: PKCS#8 (`BEGIN PRIVATE KEY`) or SEC1 (`BEGIN EC PRIVATE KEY`, what
/// `openssl ecparam -genkey` writes).
fn private_key(path: &Path) -> Result<SigningKey> {
    let pem = read(path)?;
    if let Ok(k) = SigningKey::from_pkcs8_pem(&pem) {
        return Ok(k);
    }
    p256::SecretKey::from_sec1_pem(&pem).map(SigningKey::from).map_err(|e| bad(path, format!("not a P-256 private key in PEM (PKCS#8 or SEC1): {e}")))
}

fn public_key(path: &Path) -> Result<VerifyingKey> {
    VerifyingKey::from_public_key_pem(&read(path)?).map_err(|e| bad(path, format!("not a P-256 public key in PEM: {e}")))
}

/// model-signing's key hint: SHA-256 of the public key's PEM (SubjectPublicKeyInfo).
fn hint(k: &VerifyingKey) -> Result<String> {
    let pem = k.to_public_key_pem(LineEnding::LF).map_err(|e| Error::Invalid(format!("public key: {e}")))?;
    Ok(sos_model::fsutil::sha256_hex(pem.as_bytes()))
}

/// The bundle for `statement`, signed with the key in `key_path`.
pub fn sign(statement: &Json, key_path: &Path) -> Result<Json> {
    let key = private_key(key_path)?;
    let payload = serde_json::to_vec(statement).expect("a JSON value serializes");
    let sig: DerSignature = key.sign(&pae(&payload));
    Ok(json!({
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": hint(key.verifying_key())?}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": B64.encode(&payload),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": B64.encode(sig.as_bytes()), "keyid": ""}],
        },
    }))
}

/// Whether `doc` is a Sigstore bundle rather than a bare statement.
pub fn is_bundle(doc: &Json) -> bool {
    doc.get("dsseEnvelope").is_some()
}

/// The statement a bundle signs, once its signature checks out against the public key.
pub fn open(bundle: &Json, bundle_path: &Path, key_path: &Path) -> Result<Json> {
    if bundle["mediaType"] != BUNDLE_MEDIA_TYPE {
        return Err(bad(bundle_path, format!("media type {}, expected {BUNDLE_MEDIA_TYPE}", bundle["mediaType"])));
    }
    let key = public_key(key_path)?;
    if let Some(h) = bundle["verificationMaterial"]["publicKey"]["hint"].as_str() {
        if h != hint(&key)? {
            return Err(bad(bundle_path, format!("signed with another key than {} (key hint {h})", key_path.display())));
        }
    }
    let env = &bundle["dsseEnvelope"];
    if env["payloadType"] != PAYLOAD_TYPE {
        return Err(bad(bundle_path, format!("payload type {}, expected {PAYLOAD_TYPE}", env["payloadType"])));
    }
    let b64 = |v: &Json, what: &str| B64.decode(v.as_str().unwrap_or("")).map_err(|e| bad(bundle_path, format!("{what} is not base64: {e}")));
    let payload = b64(&env["payload"], "the payload")?;
    let sig = b64(&env["signatures"][0]["sig"], "the signature")?;
    let sig = DerSignature::try_from(sig.as_slice()).map_err(|e| bad(bundle_path, format!("not an ECDSA signature: {e}")))?;
    key.verify(&pae(&payload), &sig).map_err(|_| bad(bundle_path, format!("the signature does not verify with {}", key_path.display())))?;
    serde_json::from_slice(&payload).map_err(|e| bad(bundle_path, format!("the signed payload is not JSON: {e}")))
}
