//! Model files: a GGUF of an architecture the engine knows ([`crate::engine::Arch`]), described as a [`ModelDescriptor`] from its
//! metadata and tensors.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use metainf_protocol::{ContentId, ModelDescriptor};

use crate::error::{ProfilerError, Result};

/// File name of the default model (SmolLM2-135M-Instruct, Q4_1).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// File name of the second shipped model (Gemma 3 270M, Q4_K_M:
/// `scripts/fetch-model.sh gemma3-270m`).
pub const GEMMA3_MODEL_FILE: &str = "gemma-3-270m-Q4_K_M.gguf";

/// Where the default model is expected: `$METAINF_MODEL`, else `$METAINF_CACHE/models/…`, else
/// `~/.cache/metainf/models/…` (where `scripts/fetch-model.sh` puts it). `None` without a home.
pub fn default_model_path() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("METAINF_MODEL") {
        return Some(std::path::PathBuf::from(p));
    }
    cached_model_path(DEFAULT_MODEL_FILE)
}

/// Where `scripts/fetch-model.sh` caches the model file `file`: `$METAINF_CACHE/models/…`, else
/// `~/.cache/metainf/models/…`. `None` without a home.
pub fn cached_model_path(file: &str) -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    let cache = std::env::var_os("METAINF_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/metainf")))?;
    Some(cache.join("models").join(file))
}

/// The name a model file is served under: its file name without `.gguf` and without a
/// trailing quantization tag (`SmolLM2-135M-Instruct.Q4_1.gguf` → `SmolLM2-135M-Instruct`).
pub fn served_name(path: &Path) -> Option<String> {
    let stem = path.file_stem()?.to_string_lossy().into_owned();
    let is_quant = |tag: &str| {
        let t = tag.to_ascii_uppercase();
        ["Q", "IQ", "F16", "F32", "BF16"].iter().any(|p| {
            t.strip_prefix(p)
                .is_some_and(|rest| p.len() > 2 || rest.starts_with(|c: char| c.is_ascii_digit()))
        })
    };
    let name = match stem.rsplit_once(['.', '-']) {
        Some((base, tag)) if !base.is_empty() && is_quant(tag) => base.to_owned(),
        _ => stem,
    };
    (!name.is_empty()).then_some(name)
}

/// Reads the GGUF at `path` and describes it. The weights digest is BLAKE3 over the whole file,
/// so two files with the same name but other weights are different models.
pub fn describe(path: &Path) -> Result<ModelDescriptor> {
    let open = |p: &Path| {
        File::open(p).map_err(|e| ProfilerError::Model(format!("cannot open {}: {e}", p.display())))
    };
    let (_, content) = crate::gguf::open(path)?;
    let text = |key: &str| {
        content
            .metadata
            .get(key)
            .and_then(|v| v.to_string().ok().cloned())
    };
    let architecture = text("general.architecture")
        .ok_or_else(|| ProfilerError::Model("no general.architecture in the GGUF".into()))?;
    crate::engine::Arch::from_name(&architecture)?;
    // Served under its file's name, as inference servers do (clients ask for
    // `SmolLM2-135M-Instruct`, not the GGUF's free-form `general.name`).
    let name = served_name(path)
        .or_else(|| text("general.name"))
        .unwrap_or_else(|| "model".into());
    let context_length = content
        .metadata
        .get(&format!("{architecture}.context_length"))
        .and_then(|v| v.to_u32().ok())
        .unwrap_or(0);
    // Parameters and bytes per tensor; the quantization is the dtype holding most parameters.
    let mut parameters = 0u64;
    let mut bits = 0f64;
    let mut by_dtype: HashMap<String, u64> = HashMap::new();
    for info in content.tensor_infos.values() {
        let n = info.shape.elem_count() as u64;
        let dtype = info.ggml_dtype;
        parameters += n;
        bits += n as f64 * 8.0 * dtype.type_size() as f64 / dtype.block_size() as f64;
        *by_dtype.entry(format!("{dtype:?}")).or_default() += n;
    }
    let quantization = by_dtype
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map_or_else(|| "unknown".to_owned(), |(d, _)| d);
    let mut hasher = blake3::Hasher::new();
    let mut reader = BufReader::with_capacity(1 << 20, open(path)?);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| ProfilerError::Model(format!("cannot read {}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(ModelDescriptor {
        name,
        architecture,
        parameters,
        quantization,
        bits_per_weight: if parameters > 0 {
            bits / parameters as f64
        } else {
            0.0
        },
        context_length,
        weights_digest: ContentId(*hasher.finalize().as_bytes()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_that_are_not_models_get_clear_errors() {
        let dir = std::env::temp_dir().join(format!("metainf-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.gguf");
        std::fs::write(&junk, b"definitely not a gguf file").unwrap();
        let err = describe(&junk).unwrap_err().to_string();
        assert!(err.contains("is not a GGUF model"), "{err}");
        let err = describe(&dir.join("missing.gguf")).unwrap_err().to_string();
        assert!(err.contains("cannot open"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod served_name_tests {
    use super::*;

    #[test]
    fn models_are_served_under_their_file_name_without_the_quantization() {
        let name = |p: &str| served_name(Path::new(p)).unwrap();
        assert_eq!(
            name("/m/SmolLM2-135M-Instruct.Q4_1.gguf"),
            "SmolLM2-135M-Instruct"
        );
        assert_eq!(name("llama-3-8b-Q4_K_M.gguf"), "llama-3-8b");
        assert_eq!(name("tiny.f16.gguf"), "tiny");
        assert_eq!(name("Qwen2-0.5B.gguf"), "Qwen2-0.5B");
        assert_eq!(name("model.gguf"), "model");
    }
}
