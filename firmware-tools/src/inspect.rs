//! `fwtool inspect`: say what a file is — an image, a root, a manifest, an announcement,
//! or a release directory — without trusting it.

use crate::files::read_limited;
use crate::release;
use anyhow::{bail, Context, Result};
use proto::codec::{self, Kind};
use proto::envelope::{envelope_limit, Envelope};
use serde_json::{json, Value};
use std::path::Path;

/// A description of `path` as JSON; the caller prints it as text or JSON.
pub fn inspect(path: &Path) -> Result<Value> {
    if path.is_dir() {
        let (bytes, env) = release::read_manifest_envelope(path)?;
        return describe_envelope(&bytes, &env, Kind::Manifest);
    }
    let mut prefix = read_prefix(path)?;
    if prefix.starts_with(&codec::MAGIC) {
        let kind =
            codec::peek_kind(&prefix).with_context(|| format!("reading {}", path.display()))?;
        if kind != Kind::Envelope {
            bail!(
                "{}: a bare {kind} without an envelope is never stored; nothing to inspect",
                path.display()
            );
        }
        prefix = read_limited(path, Kind::Envelope.max_len(), "message")?;
        // Which payload? Decode the envelope under the largest limit, then re-check.
        let what = || format!("decoding {}", path.display());
        let env: Envelope = codec::decode(Kind::Envelope, &prefix).with_context(what)?;
        let payload_kind = env.payload_kind().with_context(what)?;
        let env = Envelope::decode(&prefix, payload_kind).with_context(what)?;
        return describe_envelope(&prefix, &env, payload_kind);
    }
    let size = std::fs::metadata(path)
        .with_context(|| format!("reading the size of {}", path.display()))?
        .len();
    let header = proto::image::inspect(&prefix, size)
        .with_context(|| format!("inspecting {}", path.display()))?;
    Ok(json!({ "type": "image", "size": size, "header": header }))
}

fn read_prefix(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut prefix = Vec::new();
    std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?
        .take(proto::image::INSPECT_PREFIX as u64)
        .read_to_end(&mut prefix)?;
    Ok(prefix)
}

fn describe_envelope(bytes: &[u8], env: &Envelope, kind: Kind) -> Result<Value> {
    if bytes.len() > envelope_limit(kind) {
        bail!(
            "{kind} envelope is larger than the {}-byte limit",
            envelope_limit(kind)
        );
    }
    let signers: Vec<String> = env.signatures.iter().map(|s| s.key_id.to_hex()).collect();
    let payload: Value = match kind {
        Kind::Root => {
            serde_json::to_value(codec::decode::<proto::root::Root>(kind, &env.payload)?)?
        }
        Kind::Manifest => {
            let m: proto::manifest::Manifest = codec::decode(kind, &env.payload)?;
            let mut v = serde_json::to_value(&m)?;
            // A chunk list is long; summarise it.
            v["chunks"] = json!({ "count": m.chunks.len() });
            v
        }
        Kind::Announcement => serde_json::to_value(codec::decode::<
            proto::announcement::Announcement,
        >(kind, &env.payload)?)?,
        Kind::StatusReport => serde_json::to_value(codec::decode::<proto::status::StatusReport>(
            kind,
            &env.payload,
        )?)?,
        Kind::Revocations => serde_json::to_value(
            codec::decode::<proto::revocation::Revocations>(kind, &env.payload)?,
        )?,
        Kind::Holds => {
            serde_json::to_value(codec::decode::<proto::rollout::Holds>(kind, &env.payload)?)?
        }
        Kind::Envelope | Kind::BlobRequest | Kind::BlobResponse => {
            bail!("a {kind} is never signed; nothing to inspect")
        }
    };
    Ok(json!({
        "type": kind.name(),
        "digest": proto::Digest::of(bytes).to_hex(),
        "size": bytes.len(),
        "verified": false,
        "signers": signers,
        "payload": payload,
    }))
}
