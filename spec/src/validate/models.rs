//! models: sources, hashes, sizes read from the GGUF header, and whether each fits the
//! inference cgroup once its KV cache and compute buffers are counted.

use super::{Context, Validator, is_sha256, sha256_message};
use crate::gguf;
use crate::model::{Cgroups, Hardware, Model, ModelSource};
use crate::raw;
use crate::units::{format_bytes, mib, parse_bytes};

const DEFAULT_CONTEXT: u32 = 2048;
const DEFAULT_BATCH: u32 = 512;
/// llama.cpp keeps a KV stream per parallel sequence; beyond this a Pi runs out of memory first.
const MAX_PARALLEL: u32 = 64;

impl Validator<'_> {
    /// Items that could not be read (`None`, already reported) are skipped, the rest checked.
    pub(super) fn models(
        &mut self,
        models: &[Option<raw::Model>],
        hw: Option<&Hardware>,
        cg: Option<&Cgroups>,
    ) -> Option<Vec<Model>> {
        let mut out = Vec::new();
        let mut ok = true;
        for (i, m) in models.iter().enumerate() {
            let p = format!("models[{i}]");
            let Some(m) = m else {
                ok = false;
                continue;
            };
            if models[..i].iter().flatten().any(|x| x.id == m.id) {
                self.err(
                    &format!("{p}.id"),
                    format!("model id `{}` is used twice; ids name models in API requests", m.id),
                );
            }
            match self.model(&p, m, hw, cg) {
                Some(model) => out.push(model),
                None => ok = false,
            }
        }
        (ok && hw.is_some() && cg.is_some()).then_some(out)
    }

    /// Checks one model; those checks that need the board or the cgroups run when they are valid.
    fn model(&mut self, p: &str, m: &raw::Model, hw: Option<&Hardware>, cg: Option<&Cgroups>) -> Option<Model> {
        let at = |k: &str| format!("{p}.{k}");
        let mut ok = true;
        if m.id.is_empty()
            || m.id.len() > 64
            || !m.id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
        {
            self.err(
                &at("id"),
                format!("`{}` is not a model id; use up to 64 letters, digits, `.`, `_`, `:` and `-`", m.id),
            );
            ok = false;
        }
        if !is_sha256(&m.sha256) {
            self.err(&at("sha256"), sha256_message(&m.sha256));
            ok = false;
        }
        let declared_size = self.qty(&at("size"), m.size.as_ref(), parse_bytes);
        ok &= m.size.is_none() || declared_size.is_some();
        let mut header = None;
        let source = match (&m.path, &m.url, self.ctx) {
            (Some(_), Some(_), _) => {
                self.err_key(&at("url"), "give path or url, not both");
                None
            }
            (None, None, Context::Host) => {
                self.err_key(
                    p,
                    "missing the model's source: add path (a local GGUF file) or url (the device fetches it)",
                );
                None
            }
            (None, None, Context::Device) => Some(ModelSource::Store),
            (Some(path), None, Context::Host) => {
                let full = self.existing_file(&at("path"), path, "model file")?;
                match gguf::read_header(&full) {
                    Ok(h) => header = Some(h),
                    Err(e) => {
                        self.err(
                            &at("path"),
                            format!("{e}; kiln serves GGUF models (convert with llama.cpp's convert_hf_to_gguf.py)"),
                        );
                        return None;
                    }
                }
                Some(ModelSource::Path(full))
            }
            (Some(_), None, Context::Device) => Some(ModelSource::Store),
            (None, Some(url), _) => {
                if !(url.starts_with("https://") || url.starts_with("http://")) || url.contains(char::is_whitespace) {
                    self.err(&at("url"), format!("`{url}` is not an http(s) URL"));
                }
                if m.size.is_none() {
                    self.err_key(p, "a url model needs `size:` (its file size, e.g. 1.1GiB) so the memory budget is checked before the device downloads it");
                    ok = false;
                }
                Some(ModelSource::Url(url.clone()))
            }
        };
        let size_bytes = match (&header, declared_size) {
            (Some(h), Some(d)) if d != h.file_size_bytes => {
                self.err(
                    &at("size"),
                    format!(
                        "says {} but the file has {} bytes; remove size (it is read from the file) or fix it",
                        format_bytes(d),
                        h.file_size_bytes
                    ),
                );
                h.file_size_bytes
            }
            (Some(h), _) => h.file_size_bytes,
            (None, Some(d)) => d,
            (None, None) => 0,
        };
        let context = m.context.unwrap_or(DEFAULT_CONTEXT);
        if !(128..=1_048_576).contains(&context) {
            self.err(&at("context"), format!("{context} tokens is outside 128-1048576"));
        }
        if let Some(trained) = header.as_ref().and_then(|h| h.context_length)
            && u64::from(context) > trained
        {
            self.err(
                &at("context"),
                format!("{context} tokens is more than this model was trained for ({trained}); use at most {trained}"),
            );
        }
        let board_cores = hw.map_or(1, |hw| hw.profile.cores);
        let inference_cpus = cg.and_then(|cg| cg.inference.cpus.as_ref());
        let cores = inference_cpus.map_or(board_cores.saturating_sub(1).max(1), |c| c.len() as u32);
        let threads = m.threads.unwrap_or(cores);
        if threads == 0 || (hw.is_some() && threads > board_cores) {
            self.err(&at("threads"), format!("{threads} threads on {board_cores} CPUs; use 1-{board_cores}"));
        } else if threads > cores && inference_cpus.is_some() {
            self.warn(
                &at("threads"),
                format!("{threads} threads on the inference cgroup's {cores} CPUs will contend; use {cores}"),
            );
        }
        let batch = m.batch.unwrap_or(DEFAULT_BATCH.min(context));
        if batch == 0 || batch > context {
            self.err(&at("batch"), format!("{batch} is outside 1-{context} (the context)"));
        }
        let parallel = m.parallel.unwrap_or(1);
        if !(1..=MAX_PARALLEL).contains(&parallel) {
            self.err(&at("parallel"), format!("{parallel} is outside 1-{MAX_PARALLEL}"));
        }
        if m.chat_template.as_deref().is_some_and(|t| t.trim().is_empty()) {
            self.err(&at("chat-template"), "an empty template; remove chat-template to use the model's own");
        }
        if let Some(s) = &m.sampling {
            self.sampling(&at("sampling"), s);
        }
        let mut model = Model {
            id: m.id.clone(),
            source: source?,
            sha256: m.sha256.clone(),
            size_bytes,
            kv_bytes: None,
            repacked_bytes: None,
            context,
            threads,
            batch,
            parallel,
            pin: m.pin.unwrap_or(false),
            priority: m.priority.unwrap_or(0),
            chat_template: m.chat_template.clone(),
            sampling: m.sampling.clone().unwrap_or_default(),
        };
        if let Some(h) = &header {
            model.complete_from(h, hw.map_or(gguf::Repack::None, |hw| hw.profile.cpu_repack));
        }
        let (kv_bytes, repacked_bytes) = (model.kv_bytes, model.repacked_bytes);
        if let Some(max) = cg.and_then(|cg| cg.inference.memory_max_bytes)
            && model.footprint_bytes() > max
        {
            let tokens = if parallel > 1 {
                format!("{context} tokens x {parallel} parallel")
            } else {
                format!("{context} tokens")
            };
            let kv = kv_bytes.map_or("KV unknown".to_string(), |k| format!("KV {} MiB for {tokens}", mib(k)));
            let lower = if parallel > 1 { "lower context or parallel, or" } else { "lower context or" };
            let kv = match repacked_bytes {
                Some(r) if r > 0 => format!("{kv} + {} MiB of weights llama.cpp repacks for this CPU", mib(r)),
                _ => kv,
            };
            self.err(
                    p,
                    format!(
                        "needs {} MiB (weights {} MiB + {kv} + compute {} MiB) but cgroups.inference.memory-max is {} MiB; {lower} raise memory-max",
                        mib(model.footprint_bytes()),
                        mib(size_bytes),
                        mib(crate::model::compute_buffer_bytes(batch)),
                        mib(max)
                    ),
                );
        }
        ok.then_some(model)
    }

    fn sampling(&mut self, p: &str, s: &raw::Sampling) {
        let ranges: [(&str, Option<f64>, f64, f64); 4] = [
            ("temperature", s.temperature, 0.0, 5.0),
            ("top-p", s.top_p, 0.0, 1.0),
            ("min-p", s.min_p, 0.0, 1.0),
            ("repeat-penalty", s.repeat_penalty, 0.0, 5.0),
        ];
        for (k, v, lo, hi) in ranges {
            if let Some(v) = v
                && !(lo..=hi).contains(&v)
            {
                self.err(&format!("{p}.{k}"), format!("{v} is outside {lo}-{hi}"));
            }
        }
        if s.max_tokens == Some(0) {
            self.err(&format!("{p}.max-tokens"), "0 would generate nothing");
        }
    }
}
