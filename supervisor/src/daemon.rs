//! Where kilnd's processes run: the cgroups of the spec (kilnd's own leaf, `inference` for the
//! workers, `prewarm` for store->tmpfs copies, whose tmpfs pages are charged to it), and
//! prewarm copies run as child processes in the prewarm cgroup so its io/cpu weight and memory
//! accounting apply to them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use kiln_spec::Spec;

use crate::cgroup::{self, CgroupBackend, CgroupHandle, Version};

/// The cgroup parent kilnd uses on cgroup v1 (on v2 it is the service's delegated subtree).
pub fn parent_name() -> String {
    std::env::var("KILND_CGROUP_PARENT").unwrap_or_else(|_| "kiln".into())
}

#[derive(Debug)]
pub struct Placement {
    pub backend: Arc<dyn CgroupBackend>,
    pub inference: Option<CgroupHandle>,
    pub prewarm: Option<CgroupHandle>,
    /// One cgroup per model's worker, under `inference` (no limits of their own: the
    /// inference cgroup's cover all workers; their memory.events tell whose OOM kill it was).
    pub models: std::collections::HashMap<String, CgroupHandle>,
    created: Vec<CgroupHandle>,
}

impl Placement {
    /// Detects the cgroup setup and creates kilnd's cgroups with the spec's limits. Without a
    /// writable cgroup fs it says so once and carries on without limits.
    pub fn create(spec: &Spec) -> Result<Placement> {
        let backend: Arc<dyn CgroupBackend> = Arc::from(cgroup::detect(&parent_name()));
        let version = backend.version();
        let mut created = Vec::new();
        if version == Version::None {
            tracing::warn!("no writable cgroup filesystem: workers and prewarm copies run without cgroup limits");
            return Ok(Placement { backend, inference: None, prewarm: None, models: Default::default(), created });
        }
        if let Some(leaf) = backend.enter_leaf("supervisor").context("moving kilnd into its leaf cgroup")? {
            backend.set_limits(&leaf, &spec.cgroups.kilnd).context("applying cgroups.kilnd")?;
        }
        let inference =
            backend.create("inference", &spec.cgroups.inference).context("creating the inference cgroup")?;
        let prewarm = backend.create("prewarm", &spec.cgroups.prewarm).context("creating the prewarm cgroup")?;
        created.push(inference.clone());
        created.push(prewarm.clone());
        let mut models = std::collections::HashMap::new();
        for m in &spec.models {
            let cg = backend
                .create(&format!("inference/{}", m.id), &kiln_spec::model::Limits::default())
                .with_context(|| format!("creating the cgroup of {}'s worker", m.id))?;
            created.push(cg.clone());
            models.insert(m.id.clone(), cg);
        }
        tracing::info!(version = ?version, "cgroups ready: inference (one child per model) and prewarm");
        Ok(Placement { backend, inference: Some(inference), prewarm: Some(prewarm), models, created })
    }

    /// Runs `kilnd prewarm --now IDS` as a child in the prewarm cgroup.
    pub fn spawn_prewarm(&self, spec_path: &Path, state_dir: Option<&Path>, ids: &[String]) -> Result<Child> {
        let exe: PathBuf = std::env::current_exe().context("finding kilnd's own executable")?;
        let mut cmd = Command::new(exe);
        cmd.arg("--spec").arg(spec_path);
        if let Some(dir) = state_dir {
            cmd.arg("--state-dir").arg(dir);
        }
        cmd.args(["prewarm", "--now"]).args(ids);
        let child = cmd.spawn().context("starting a prewarm copy")?;
        if let Some(cg) = &self.prewarm {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            self.backend.attach(cg, pid).context("placing the prewarm copy in its cgroup")?;
        }
        Ok(child)
    }

    /// Removes the cgroups kilnd created (children first); ones still holding processes stay.
    pub fn cleanup(&self) {
        for cg in self.created.iter().rev() {
            if let Err(e) = self.backend.remove(cg) {
                tracing::warn!("leaving cgroup {}: {e}", cg.name());
            }
        }
    }
}
