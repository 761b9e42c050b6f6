//! The normalized spec, `/etc/kiln/spec.yaml` on the device: every default written out, units
//! canonical, host-only details replaced (model files by their store hash, the token file by
//! its device path) and secrets left out. kilnd reads it back in the device context.

use crate::model::{self, ModelSource, Spec};
use crate::raw::{self, Quantity, RawSpec};
use crate::units::{format_bytes, format_cpuset, format_duration};

/// The device path of the API token.
pub const API_TOKEN_PATH: &str = "/etc/kiln/api-token";

fn q(text: String) -> Quantity {
    Quantity(text)
}

fn bytes(b: u64) -> Quantity {
    q(format_bytes(b))
}

fn pct(p: f64) -> Quantity {
    q(format!("{p}%"))
}

fn limits(l: &model::Limits) -> Option<raw::Limits> {
    let out = raw::Limits {
        memory_max: l.memory_max_bytes.map(bytes),
        memory_high: l.memory_high_bytes.map(bytes),
        swap_max: l.swap_max_bytes.map(bytes),
        cpus: l.cpus.as_ref().map(|c| q(format_cpuset(c))),
        cpu_weight: l.cpu_weight,
        cpu_quota: l.cpu_quota_percent.map(|p| q(format!("{p}%"))),
        io_weight: l.io_weight,
    };
    (out != raw::Limits::default()).then_some(out)
}

/// The device's spec, as YAML text.
pub fn normalized_spec(spec: &Spec, raw: &RawSpec) -> Result<String, super::RenderError> {
    let s = spec;
    let hw = &s.hardware;
    let doc = RawSpec {
        api_version: crate::validate::API_VERSION.into(),
        name: s.name.clone(),
        hardware: raw::Hardware {
            board: hw.profile.board,
            ram: bytes(hw.ram_bytes),
            storage: Some(hw.storage),
            pcie_gen: hw.pcie_gen,
            overclock: raw.hardware.overclock.clone(),
            cooling: raw.hardware.cooling.clone(),
        },
        base: Some(match &s.base {
            model::Base::Image { path, sha256 } => raw::Base {
                image: Some(path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()),
                sha256: Some(sha256.clone()),
                debian: None,
            },
            model::Base::Debian { suite, arch, mirror, packages } => raw::Base {
                image: None,
                sha256: None,
                debian: Some(raw::Debian {
                    suite: Some(suite.clone()),
                    arch: Some(*arch),
                    mirror: Some(mirror.clone()),
                    packages: packages.clone(),
                }),
            },
        }),
        system: raw::System {
            hostname: Some(s.system.hostname.clone()),
            timezone: Some(s.system.timezone.clone()),
            locale: Some(s.system.locale.clone()),
            users: s
                .system
                .users
                .iter()
                .map(|u| raw::User {
                    name: u.name.clone(),
                    ssh_authorized_keys: u.ssh_authorized_keys.clone(),
                    password_hash: None,
                    password: None,
                    sudo: Some(u.sudo),
                    groups: u.groups.clone(),
                })
                .collect(),
            ssh: Some(raw::Ssh {
                enable: Some(s.system.ssh_enable),
                password_authentication: Some(s.system.ssh_password_authentication),
            }),
            // The Wi-Fi passphrase stays in the NetworkManager file; the device spec has no secrets.
            wifi: None,
            packages: s.system.packages.clone(),
        },
        memory: raw::Memory {
            zram: s.memory.zram.as_ref().map(|z| raw::Zram {
                size: bytes(z.size_bytes),
                algorithm: Some(z.algorithm),
                priority: Some(z.priority),
            }),
            swappiness: Some(s.memory.swappiness),
            vfs_cache_pressure: Some(s.memory.vfs_cache_pressure),
            page_cluster: Some(s.memory.page_cluster),
            tmpfs: s
                .memory
                .tmpfs
                .as_ref()
                .map(|t| raw::Tmpfs { path: Some(t.path.clone()), size: bytes(t.size_bytes) }),
            malloc_arena_max: Some(s.memory.malloc_arena_max),
            disk_swap: Some(s.memory.disk_swap),
        },
        cgroups: raw::Cgroups {
            inference: limits(&s.cgroups.inference),
            kilnd: limits(&s.cgroups.kilnd),
            prewarm: limits(&s.cgroups.prewarm),
        },
        models: s.models.iter().map(model).collect(),
        cache: raw::Cache {
            hot_budget: Some(bytes(s.cache.hot_budget_bytes)),
            eviction: Some(s.cache.eviction),
            keep_alive: Some(q(format_duration(s.cache.keep_alive_secs))),
            thresholds: Some(raw::Thresholds {
                warn: Some(pct(s.cache.warn_percent)),
                evict: Some(pct(s.cache.evict_percent)),
                emergency: Some(pct(s.cache.emergency_percent)),
                psi: Some(pct(s.cache.psi_percent)),
            }),
            prewarm: Some(raw::Prewarm {
                windows: s.cache.prewarm.windows.iter().map(ToString::to_string).collect(),
                models: s.cache.prewarm.models.clone(),
                rate: s.cache.prewarm.rate_bytes_per_sec.map(|r| q(format!("{}/s", format_bytes(r)))),
                at_boot: Some(s.cache.prewarm.at_boot),
            }),
            responses: Some(raw::ResponseCache {
                memory: Some(bytes(s.cache.responses.memory_bytes)),
                disk: Some(bytes(s.cache.responses.disk_bytes)),
                ttl: Some(q(format_duration(s.cache.responses.ttl_secs))),
            }),
            prefix: Some(raw::PrefixCache {
                dir: Some(s.cache.prefix.dir.clone()),
                size: Some(bytes(s.cache.prefix.size_bytes)),
                ttl: Some(q(format_duration(s.cache.prefix.ttl_secs))),
            }),
        },
        supervisor: raw::Supervisor {
            listen: Some(s.supervisor.listen.to_string()),
            api_token_file: s.supervisor.api_token_file.as_ref().map(|_| API_TOKEN_PATH.to_string()),
            queue_depth: Some(s.supervisor.queue_depth),
            limits: Some(raw::RequestLimits {
                body: Some(bytes(s.supervisor.body_limit_bytes)),
                prompt_tokens: s.supervisor.prompt_tokens_limit,
                max_tokens: Some(s.supervisor.max_tokens_limit),
            }),
            log_level: Some(s.supervisor.log_level),
            deploy: Some(raw::Deploy {
                health_timeout: Some(q(format_duration(s.supervisor.health_timeout_secs))),
                keep_generations: Some(s.supervisor.keep_generations),
            }),
        },
    };
    let body = serde_saphyr::to_string(&doc).map_err(|e| super::RenderError::Spec(e.to_string()))?;
    Ok(format!(
        "# The spec of this device's generation, normalized by kiln: defaults written out, models by\n# their store hash, secrets left out. Managed by kiln: edit the source spec and re-deploy.\n{body}"
    ))
}

fn model(m: &model::Model) -> raw::Model {
    raw::Model {
        id: m.id.clone(),
        path: None,
        url: match &m.source {
            ModelSource::Url(u) => Some(u.clone()),
            ModelSource::Path(_) | ModelSource::Store => None,
        },
        sha256: m.sha256.clone(),
        size: Some(bytes(m.size_bytes)),
        context: Some(m.context),
        threads: Some(m.threads),
        batch: Some(m.batch),
        parallel: (m.parallel > 1).then_some(m.parallel),
        pin: Some(m.pin),
        priority: Some(m.priority),
        chat_template: m.chat_template.clone(),
        sampling: (m.sampling != raw::Sampling::default()).then(|| m.sampling.clone()),
    }
}
