//! The installer (`ferry-cni install|uninstall`, run by the agent
//! DaemonSet's init container): copies the plugin into the node's CNI binary
//! directory and appends `{"type": "ferry-cni", ...}` to the `plugins` of the
//! conflist the runtime uses (the first config file of the directory, in
//! name order, as libcni picks it). Idempotent: a second install changes
//! nothing; an older entry of ours is replaced, wherever it was, by one at
//! the end; every other plugin and field is kept. Uninstall removes our
//! entries from every conflist and the binary. Files are replaced
//! atomically (written beside, then renamed), so a runtime never reads half
//! a file.

use std::{
    fs,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use serde_json::{json, Value};

/// The plugin's `type` (and its binary's name).
pub const PLUGIN_TYPE: &str = "ferry-cni";

#[derive(Debug)]
pub enum InstallError {
    /// No CNI config in the directory yet (the cluster's network plugin
    /// writes it; retry once it has).
    NoConfig(PathBuf),
    /// The config the runtime uses is a single-plugin `.conf`: it cannot be
    /// chained without converting it.
    NotAList(PathBuf),
    Invalid {
        path: PathBuf,
        why: String,
    },
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl std::fmt::Display for InstallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InstallError::NoConfig(d) => write!(
                f,
                "no CNI network config in {} yet (the cluster's network plugin writes one; retrying is safe)",
                d.display()
            ),
            InstallError::NotAList(p) => write!(
                f,
                "{} is a single-plugin config: ferry-cni chains only into a .conflist (convert it: {{\"cniVersion\", \"name\", \"plugins\": [<the .conf>]}})",
                p.display()
            ),
            InstallError::Invalid { path, why } => write!(f, "{}: {why}", path.display()),
            InstallError::Io { path, source } => write!(f, "{}: {source}", path.display()),
        }
    }
}

impl std::error::Error for InstallError {}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What ferry-cni's conflist entry says (the plugin's config fields).
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub socket: String,
    pub timeout_seconds: u64,
    pub exclude_namespaces: Vec<String>,
}

impl Entry {
    pub fn to_json(&self) -> Value {
        json!({
            "type": PLUGIN_TYPE,
            "socketPath": self.socket,
            "timeoutSeconds": self.timeout_seconds,
            "excludeNamespaces": self.exclude_namespaces,
        })
    }
}

fn is_ours(p: &Value) -> bool {
    p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn plugins_of<'a>(doc: &'a mut Value, path: &Path) -> Result<&'a mut Vec<Value>, InstallError> {
    doc.get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| InstallError::Invalid {
            path: path.to_owned(),
            why: "no `plugins` array: not a conflist".into(),
        })
}

/// `doc` with ferry-cni's entry last (any earlier entry of ours removed).
pub fn with_entry(doc: &Value, entry: &Value, path: &Path) -> Result<Value, InstallError> {
    let mut doc = doc.clone();
    let plugins = plugins_of(&mut doc, path)?;
    plugins.retain(|p| !is_ours(p));
    if plugins.is_empty() {
        return Err(InstallError::Invalid {
            path: path.to_owned(),
            why: "no plugin to chain after (ferry-cni needs the plugin that sets up the pod's network first)".into(),
        });
    }
    plugins.push(entry.clone());
    Ok(doc)
}

/// `doc` without any ferry-cni entry.
pub fn without_entry(doc: &Value, path: &Path) -> Result<Value, InstallError> {
    let mut doc = doc.clone();
    plugins_of(&mut doc, path)?.retain(|p| !is_ours(p));
    Ok(doc)
}

/// The config file the runtime uses: the first `.conf`, `.conflist` or
/// `.json` of `dir` in name order.
pub fn active_config(dir: &Path) -> Result<PathBuf, InstallError> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io(dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            p.extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| matches!(x, "conf" | "conflist" | "json"))
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoConfig(dir.to_owned()))
}

fn read_json(path: &Path) -> Result<Value, InstallError> {
    let text = fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&text).map_err(|e| InstallError::Invalid {
        path: path.to_owned(),
        why: format!("not JSON: {e}"),
    })
}

/// Writes `bytes` to `path` atomically with `mode`.
fn replace(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.ferry-tmp"));
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// What an install or uninstall did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Conflists written.
    pub changed: Vec<PathBuf>,
    /// Conflists already as wanted.
    pub unchanged: Vec<PathBuf>,
    /// The plugin binary written or removed.
    pub binary: Option<PathBuf>,
}

/// Installs: `source` copied to `<bin_dir>/ferry-cni` (when given), and the
/// entry put last in the active conflist of `conf_dir`.
pub fn install(conf_dir: &Path, bin_dir: &Path, source: Option<&Path>, entry: &Entry) -> Result<Report, InstallError> {
    let mut report = Report::default();
    if let Some(src) = source {
        let bytes = fs::read(src).map_err(io(src))?;
        let dst = bin_dir.join(PLUGIN_TYPE);
        if fs::read(&dst).ok().as_deref() != Some(bytes.as_slice()) {
            fs::create_dir_all(bin_dir).map_err(io(bin_dir))?;
            replace(&dst, &bytes, 0o755)?;
            report.binary = Some(dst);
        }
    }
    let path = active_config(conf_dir)?;
    if path.extension().and_then(|x| x.to_str()) != Some("conflist") {
        let doc = read_json(&path)?;
        if doc.get("plugins").is_none() {
            return Err(InstallError::NotAList(path));
        }
    }
    let doc = read_json(&path)?;
    let new = with_entry(&doc, &entry.to_json(), &path)?;
    if new == doc {
        report.unchanged.push(path);
    } else {
        let mode = fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o644);
        let mut text = serde_json::to_vec_pretty(&new).map_err(|e| InstallError::Invalid {
            path: path.clone(),
            why: e.to_string(),
        })?;
        text.push(b'\n');
        replace(&path, &text, mode)?;
        report.changed.push(path);
    }
    Ok(report)
}

/// Uninstalls: ferry-cni's entries removed from every conflist of
/// `conf_dir`, and `<bin_dir>/ferry-cni` deleted. Nothing there is fine.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> Result<Report, InstallError> {
    let mut report = Report::default();
    let entries = match fs::read_dir(conf_dir) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(conf_dir)(e)),
    };
    for path in entries.into_iter().filter(|p| p.is_file()) {
        let Ok(doc) = read_json(&path) else { continue };
        let Ok(new) = without_entry(&doc, &path) else { continue };
        if new != doc {
            let mode = fs::metadata(&path)
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0o644);
            let mut text = serde_json::to_vec_pretty(&new).map_err(|e| InstallError::Invalid {
                path: path.clone(),
                why: e.to_string(),
            })?;
            text.push(b'\n');
            replace(&path, &text, mode)?;
            report.changed.push(path);
        }
    }
    let bin = bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&bin) {
        Ok(()) => report.binary = Some(bin),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&bin)(e)),
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the temp dir, removed on drop.
    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Self {
            let d = std::env::temp_dir().join(format!(
                "ferry-cni-install-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).unwrap();
            Self(d)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn entry() -> Entry {
        Entry {
            socket: "/var/run/ferry/cni.sock".into(),
            timeout_seconds: 30,
            exclude_namespaces: vec!["kube-system".into(), "ferry-system".into()],
        }
    }

    const FLANNEL: &str = r#"{
  "name": "cbr0",
  "cniVersion": "1.0.0",
  "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

    #[test]
    fn entry_goes_last_and_everything_else_stays() {
        let doc: Value = serde_json::from_str(FLANNEL).unwrap();
        let p = Path::new("10-flannel.conflist");
        let new = with_entry(&doc, &entry().to_json(), p).unwrap();
        let plugins = new["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[..2], doc["plugins"].as_array().unwrap()[..]);
        assert_eq!(plugins[2]["type"], "ferry-cni");
        assert_eq!(plugins[2]["excludeNamespaces"][1], "ferry-system");
        assert_eq!((&new["name"], &new["cniVersion"]), (&doc["name"], &doc["cniVersion"]));
        // Idempotent.
        assert_eq!(with_entry(&new, &entry().to_json(), p).unwrap(), new);
        // An entry of ours elsewhere (older settings) moves to the end, once.
        let mut moved = doc.clone();
        moved["plugins"]
            .as_array_mut()
            .unwrap()
            .insert(0, json!({"type": "ferry-cni", "timeoutSeconds": 5}));
        assert_eq!(with_entry(&moved, &entry().to_json(), p).unwrap(), new);
        // Removal gives back the original.
        assert_eq!(without_entry(&new, p).unwrap(), doc);
        assert_eq!(without_entry(&doc, p).unwrap(), doc);
    }

    #[test]
    fn configs_that_cannot_be_chained_are_refused() {
        let p = Path::new("x.conflist");
        assert!(with_entry(&json!({"name": "n"}), &entry().to_json(), p).is_err());
        assert!(with_entry(&json!({"plugins": "no"}), &entry().to_json(), p).is_err());
        let only_ours = json!({"plugins": [{"type": "ferry-cni"}]});
        let e = with_entry(&only_ours, &entry().to_json(), p).unwrap_err();
        assert!(e.to_string().contains("no plugin to chain after"), "{e}");
    }

    #[test]
    fn install_and_uninstall_on_disk() {
        let d = Dir::new("disk");
        let (conf, bin) = (d.0.join("net.d"), d.0.join("bin"));
        fs::create_dir_all(&conf).unwrap();
        // No config yet: a clear, retryable error.
        assert!(matches!(
            install(&conf, &bin, None, &entry()),
            Err(InstallError::NoConfig(_))
        ));
        // The runtime's choice is the first file in name order; others are left alone.
        fs::write(conf.join("10-flannel.conflist"), FLANNEL).unwrap();
        fs::write(conf.join("99-other.conflist"), FLANNEL).unwrap();
        fs::write(conf.join("README"), "not a config").unwrap();
        fs::set_permissions(conf.join("10-flannel.conflist"), fs::Permissions::from_mode(0o600)).unwrap();
        let src = d.0.join("ferry-cni-build");
        fs::write(&src, b"\x7fELF plugin").unwrap();

        let r = install(&conf, &bin, Some(&src), &entry()).unwrap();
        assert_eq!(r.changed, vec![conf.join("10-flannel.conflist")]);
        assert_eq!(r.binary, Some(bin.join("ferry-cni")));
        assert_eq!(fs::read(bin.join("ferry-cni")).unwrap(), b"\x7fELF plugin");
        assert_eq!(
            fs::metadata(bin.join("ferry-cni")).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let doc = read_json(&conf.join("10-flannel.conflist")).unwrap();
        assert_eq!(doc["plugins"].as_array().unwrap().len(), 3);
        assert_eq!(
            fs::metadata(conf.join("10-flannel.conflist"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600,
            "mode kept"
        );
        assert_eq!(fs::read_to_string(conf.join("99-other.conflist")).unwrap(), FLANNEL);
        assert!(!fs::read_dir(&conf)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains("ferry-tmp")));

        // Again: nothing changes.
        let r = install(&conf, &bin, Some(&src), &entry()).unwrap();
        assert_eq!((r.changed.len(), r.unchanged.len(), r.binary), (0, 1, None));

        // Uninstall: back to the original plugins, binary gone; twice is fine.
        let r = uninstall(&conf, &bin).unwrap();
        assert_eq!(r.changed, vec![conf.join("10-flannel.conflist")]);
        let doc = read_json(&conf.join("10-flannel.conflist")).unwrap();
        assert_eq!(doc, serde_json::from_str::<Value>(FLANNEL).unwrap());
        assert!(!bin.join("ferry-cni").exists());
        assert_eq!(uninstall(&conf, &bin).unwrap(), Report::default());
        assert_eq!(uninstall(&d.0.join("absent"), &bin).unwrap(), Report::default());
    }

    #[test]
    fn a_single_plugin_conf_is_refused_with_the_remedy() {
        let d = Dir::new("conf");
        fs::write(
            d.0.join("10-bridge.conf"),
            r#"{"cniVersion":"1.0.0","name":"b","type":"bridge"}"#,
        )
        .unwrap();
        fs::write(d.0.join("20-later.conflist"), FLANNEL).unwrap();
        let e = install(&d.0, &d.0.join("bin"), None, &entry()).unwrap_err();
        assert!(matches!(e, InstallError::NotAList(_)), "{e}");
        assert!(e.to_string().contains("convert it"), "{e}");
        assert_eq!(fs::read_to_string(d.0.join("20-later.conflist")).unwrap(), FLANNEL);
    }
}
