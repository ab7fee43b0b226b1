//! The `ferry-cni` binary: a CNI plugin when a runtime runs it (`CNI_COMMAND`
//! set), else the installer (`ferry-cni install|uninstall`).

use std::{
    io::{Read, Write},
    path::PathBuf,
    process::ExitCode,
};

use ferry_cni::{client::SocketLink, install, plugin, spec};

const USAGE: &str = "\
ferry-cni: Ferry's chained CNI plugin (run by the container runtime with CNI_COMMAND set)

  ferry-cni install --conf-dir DIR --bin-dir DIR [--socket PATH] [--timeout-seconds N]
                    [--exclude-namespace NS]... [--no-copy]
      copy this binary to DIR/ferry-cni and put {\"type\": \"ferry-cni\", ...} last in the
      plugins of the first config of the conf dir (idempotent)
  ferry-cni uninstall --conf-dir DIR --bin-dir DIR
      remove ferry-cni from every conflist of the conf dir, and its binary
";

/// The most of stdin a runtime's network config may take.
const MAX_CONFIG: u64 = 1 << 20;

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        let mut stdin = Vec::new();
        let _ = std::io::stdin().take(MAX_CONFIG).read_to_end(&mut stdin);
        let out = plugin::run(
            |k| std::env::var(k).ok(),
            &stdin,
            |cfg| SocketLink {
                path: cfg.socket.clone(),
            },
        );
        let _ = std::io::stdout().write_all(out.stdout.as_bytes());
        if !out.stderr.is_empty() {
            eprintln!("ferry-cni: {}", out.stderr);
        }
        return if out.exit == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match installer(&args) {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferry-cni: {e}");
            ExitCode::FAILURE
        }
    }
}

fn installer(args: &[String]) -> Result<String, String> {
    let Some((cmd, rest)) = args.split_first() else {
        return Err(format!("no command\n{USAGE}"));
    };
    if matches!(cmd.as_str(), "-h" | "--help" | "help") {
        return Ok(USAGE.to_owned());
    }
    if cmd == "--version" {
        return Ok(format!(
            "ferry-cni {} (CNI {})",
            env!("CARGO_PKG_VERSION"),
            spec::SUPPORTED_VERSIONS.join(", ")
        ));
    }
    if !matches!(cmd.as_str(), "install" | "uninstall") {
        return Err(format!("unknown command {cmd:?}\n{USAGE}"));
    }
    let (mut conf_dir, mut bin_dir, mut socket, mut timeout) = (None, None, None, None);
    let (mut excluded, mut copy) = (Vec::new(), true);
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f, Some(v.to_owned())),
            None => (a.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or(format!("{flag} needs a value"))
        };
        match flag {
            "--conf-dir" => conf_dir = Some(PathBuf::from(value()?)),
            "--bin-dir" => bin_dir = Some(PathBuf::from(value()?)),
            "--socket" => socket = Some(value()?),
            "--timeout-seconds" => {
                let v = value()?;
                let n: u64 = v
                    .parse()
                    .map_err(|_| format!("--timeout-seconds {v:?} is not a number"))?;
                if n == 0 || n > spec::MAX_TIMEOUT.as_secs() {
                    return Err(format!("--timeout-seconds must be 1..={}", spec::MAX_TIMEOUT.as_secs()));
                }
                timeout = Some(n);
            }
            "--exclude-namespace" => excluded.push(value()?),
            "--no-copy" => copy = false,
            _ => return Err(format!("unknown argument {a:?}\n{USAGE}")),
        }
    }
    let conf_dir = conf_dir.ok_or("--conf-dir is required")?;
    let bin_dir = bin_dir.ok_or("--bin-dir is required")?;
    match cmd.as_str() {
        "install" => {
            if excluded.is_empty() {
                excluded = spec::DEFAULT_EXCLUDED.iter().map(|s| (*s).to_owned()).collect();
            }
            let entry = install::Entry {
                socket: socket.unwrap_or_else(|| spec::DEFAULT_SOCKET.to_owned()),
                timeout_seconds: timeout.unwrap_or(spec::DEFAULT_TIMEOUT.as_secs()),
                exclude_namespaces: excluded,
            };
            let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
            let r = install::install(&conf_dir, &bin_dir, copy.then_some(exe.as_path()), &entry)
                .map_err(|e| e.to_string())?;
            Ok(describe("installed", &r))
        }
        "uninstall" => {
            let r = install::uninstall(&conf_dir, &bin_dir).map_err(|e| e.to_string())?;
            Ok(describe("uninstalled", &r))
        }
        _ => Err(format!("unknown command {cmd:?}\n{USAGE}")),
    }
}

fn describe(what: &str, r: &install::Report) -> String {
    let list = |v: &[PathBuf]| v.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    format!(
        "ferry-cni {what}: conflists changed [{}], unchanged [{}], binary {}",
        list(&r.changed),
        list(&r.unchanged),
        r.binary
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "unchanged".into())
    )
}
