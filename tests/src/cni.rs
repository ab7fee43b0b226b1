//! The box as a container runtime: runs `ferry-cni` for a pod the way
//! containerd or CRI-O would (in the node's netns, the `CNI_*` variables,
//! the network config with the bridge's `prevResult` on stdin), after the
//! pod's netns and veth exist and before its application starts.

use std::{
    io::Write,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::BoxState;

/// `timeoutSeconds` the box gives the plugin unless a test says otherwise.
pub const CNI_TIMEOUT_SECONDS: u64 = 20;

/// One finished plugin run.
#[derive(Debug)]
pub struct CniRun {
    pub command: String,
    /// The exit code (None: killed by the harness's deadline).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl CniRun {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// stdout as JSON (a result, a version answer or a CNI error).
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(self.stdout.trim())
            .with_context(|| format!("ferry-cni {} printed {:?}", self.command, self.stdout))
    }

    /// Fails unless the plugin succeeded.
    pub fn check(self) -> Result<Self> {
        if !self.ok() {
            bail!(
                "ferry-cni {} failed ({:?}) after {:?}: stdout {} stderr {}",
                self.command,
                self.code,
                self.took,
                self.stdout.trim(),
                self.stderr.trim()
            );
        }
        Ok(self)
    }
}

/// A plugin run in flight (`BoxState::cni_spawn`).
pub struct PendingCni {
    command: String,
    child: Child,
    started: Instant,
    deadline: Instant,
}

impl PendingCni {
    /// Waits for it to exit; kills it at the harness's deadline (the
    /// plugin's own wait plus 10 s).
    pub fn wait(mut self) -> Result<CniRun> {
        let killed = loop {
            if self.child.try_wait()?.is_some() {
                break false;
            }
            if Instant::now() > self.deadline {
                let _ = self.child.kill();
                break true;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let took = self.started.elapsed();
        let out = self.child.wait_with_output()?;
        Ok(CniRun {
            command: self.command,
            code: if killed { None } else { out.status.code() },
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took,
        })
    }
}

impl BoxState {
    /// The network config a runtime would give ferry-cni for `pod`: the box's
    /// (a bridge plugin's) result as `prevResult`, Ferry's fields, then
    /// `overrides` (e.g. `{"timeoutSeconds": 2}`, or `null` values to drop
    /// a field).
    pub fn cni_config(&self, pod: &str, overrides: &Value) -> Result<Value> {
        let p = &self.spec.pods[self.pod_index(pod)?];
        let netns = format!("/run/netns/{}", self.pod_netns(pod));
        let mut conf = json!({
            "cniVersion": "1.0.0",
            "name": "ferry-box",
            "type": "ferry-cni",
            "socketPath": self.cni_socket(p.node).display().to_string(),
            "timeoutSeconds": CNI_TIMEOUT_SECONDS,
            "excludeNamespaces": ["kube-system"],
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": self.host_veth(self.pod_index(pod)?)},
                    {"name": "eth0", "sandbox": netns},
                ],
                "ips": [{
                    "address": format!("{}/24", self.pod_ip(pod)?),
                    "gateway": format!("10.1.{}.1", p.node + 1),
                    "interface": 1,
                }],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dns": {},
            },
        });
        if let (Some(c), Some(o)) = (conf.as_object_mut(), overrides.as_object()) {
            for (k, v) in o {
                if v.is_null() {
                    c.remove(k);
                } else {
                    c.insert(k.clone(), v.clone());
                }
            }
        }
        Ok(conf)
    }

    /// Starts `ferry-cni` with `CNI_COMMAND=command` for `pod` (namespace
    /// `default`, or `namespace` when given), in its node's netns.
    pub fn cni_spawn(&self, pod: &str, command: &str, namespace: Option<&str>, overrides: Value) -> Result<PendingCni> {
        let p = &self.spec.pods[self.pod_index(pod)?];
        let conf = self.cni_config(pod, &overrides)?;
        let wait = conf["timeoutSeconds"].as_f64().unwrap_or(CNI_TIMEOUT_SECONDS as f64);
        let sandbox = self.sandbox_id(pod);
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={sandbox};K8S_POD_UID={}",
            namespace.unwrap_or("default"),
            self.pod_uid(pod)
        );
        let mut child = self
            .node_command(p.node, &self.bin("ferry-cni"), &[])?
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &sandbox)
            .env("CNI_NETNS", format!("/run/netns/{}", self.pod_netns(pod)))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", args)
            .env("CNI_PATH", &self.bin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting ferry-cni")?;
        let started = Instant::now();
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(conf.to_string().as_bytes())?;
        }
        Ok(PendingCni {
            command: format!("{command} {pod}"),
            child,
            started,
            deadline: started + Duration::from_secs_f64(wait.clamp(0.0, 300.0)) + Duration::from_secs(10),
        })
    }

    /// Runs `ferry-cni` for `pod` to the end (see [`BoxState::cni_spawn`]).
    pub fn cni(&self, pod: &str, command: &str, overrides: Value) -> Result<CniRun> {
        self.cni_spawn(pod, command, None, overrides)?.wait()
    }
}
