//! `ferryctl check`: can this node run Ferry? Each check says what it found
//! and, when it fails, the exact remedy. Program support is probed by really
//! loading Ferry's programs (the verifier is the only reliable answer) and
//! attaching each where its kind goes, on throwaways
//! (`loader::probe_programs`).

use std::path::Path;

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Check {
    pub check: String,
    pub ok: bool,
    pub detail: String,
    pub remedy: Option<String>,
}

fn check(name: &str, ok: bool, detail: String, remedy: &str) -> Check {
    Check {
        check: name.into(),
        ok,
        detail,
        remedy: (!ok).then(|| remedy.into()),
    }
}

/// (major, minor) of a `uname -r` release string such as "6.18.44-fc".
pub fn parse_kernel(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

fn fs_magic(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs(2) fills a zeroed, properly sized struct from a valid C path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `c` outlives the call.
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as i64)
}

pub fn run(pin_root: &Path, cgroup_root: Option<&Path>) -> Vec<Check> {
    let mut out = Vec::new();
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    out.push(check(
        "privileges",
        euid == 0,
        format!("euid {euid}"),
        "run as root (the agent needs CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_SYS_PTRACE for setns)",
    ));
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let ver = parse_kernel(release.trim());
    out.push(check(
        "kernel",
        ver.is_some_and(|v| v >= (5, 10)),
        format!(
            "{} (need >= 5.10: sk_lookup, bpf_link for cgroups; >= 6.6 attaches tc by TCX)",
            release.trim()
        ),
        "upgrade the kernel to 5.10 or newer",
    ));
    let forced = std::env::var(crate::loader::TcAttach::ENV).unwrap_or_default();
    out.push(tc_attach(&forced, crate::loader::TcAttach::for_kernel()));
    out.push(check(
        "btf",
        Path::new("/sys/kernel/btf/vmlinux").exists(),
        "/sys/kernel/btf/vmlinux".into(),
        "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
    ));
    let cg2 = crate::cgroup::cgroup2_mount();
    out.push(check(
        "cgroup v2",
        cg2.is_ok(),
        cg2.as_ref()
            .map(|p| format!("mounted at {}", p.display()))
            .unwrap_or_else(|e| e.to_string()),
        "mount cgroup v2: `mount -t cgroup2 none /sys/fs/cgroup` (or boot with systemd.unified_cgroup_hierarchy=1)",
    ));
    if let Some(root) = cgroup_root {
        let ok = fs_magic(root) == Some(CGROUP2_SUPER_MAGIC);
        out.push(check(
            "pod cgroup root",
            ok,
            format!(
                "{}{}",
                root.display(),
                if ok {
                    " is on cgroup v2"
                } else {
                    " is missing or not on cgroup v2"
                }
            ),
            "point --cgroup-root at the kubelet's pod cgroups on the cgroup v2 mount",
        ));
    }
    let bpffs = crate::loader::is_bpffs(pin_root);
    out.push(check(
        "bpffs",
        bpffs,
        format!(
            "{}{}",
            pin_root.display(),
            if bpffs {
                " is on bpffs"
            } else {
                " is not on a bpf filesystem"
            }
        ),
        "mount bpffs: `mount -t bpf bpf /sys/fs/bpf`",
    ));
    if bpffs && euid == 0 {
        for (name, res) in crate::loader::probe_programs(pin_root) {
            let ok = res.is_ok();
            out.push(check(
                &format!("program {name}"),
                ok,
                res.map(|()| "loads (verifier) and attaches (on a scratch cgroup, netns or map)".into())
                    .unwrap_or_else(|e| e),
                "this kernel lacks a program type or helper Ferry needs: see the detail; a newer kernel is the fix",
            ));
        }
    } else {
        out.push(check(
            "programs",
            false,
            "not probed (needs root and bpffs)".into(),
            "fix the checks above, then run again",
        ));
    }
    out
}

/// How `tc` will be attached to pods' veths: by `FERRY_TC_ATTACH` (`forced`)
/// or else by what the kernel supports (`kernel`). TCX forced on a kernel
/// without it, or a value that names no mode, fails.
fn tc_attach(forced: &str, kernel: crate::loader::TcAttach) -> Check {
    use crate::loader::TcAttach;
    let mode = match TcAttach::parse(forced) {
        Ok(m) => m,
        Err(e) => {
            return check(
                "tc attach",
                false,
                format!("{}: {e} (the agent attaches by kernel: {kernel})", TcAttach::ENV),
                "set FERRY_TC_ATTACH to tcx, netlink or auto (or unset it)",
            )
        }
    };
    let why = if mode.is_some() {
        "forced by FERRY_TC_ATTACH"
    } else if kernel == TcAttach::Tcx {
        "kernel >= 6.6"
    } else {
        "kernel < 6.6"
    };
    let detail = match mode.unwrap_or(kernel) {
        TcAttach::Tcx => format!("tcx: TCX links, pinned ({why})"),
        TcAttach::Netlink => format!("netlink: filters on a clsact qdisc Ferry adds when missing ({why})"),
    };
    check(
        "tc attach",
        !(mode == Some(TcAttach::Tcx) && kernel == TcAttach::Netlink),
        detail,
        "this kernel has no TCX (6.6+): unset FERRY_TC_ATTACH (or set it to netlink)",
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_versions() {
        assert_eq!(super::parse_kernel("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(super::parse_kernel("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(super::parse_kernel("junk"), None);
    }

    #[test]
    fn tc_attach_modes() {
        use crate::loader::TcAttach::{Netlink, Tcx};
        let row = |forced, kernel| {
            let c = super::tc_attach(forced, kernel);
            (c.ok, c.detail)
        };
        assert_eq!(row("", Tcx), (true, "tcx: TCX links, pinned (kernel >= 6.6)".into()));
        assert_eq!(
            row("auto", Netlink),
            (
                true,
                "netlink: filters on a clsact qdisc Ferry adds when missing (kernel < 6.6)".into()
            )
        );
        assert!(row("netlink", Tcx).1.ends_with("(forced by FERRY_TC_ATTACH)"));
        let forced = super::tc_attach("tcx", Netlink);
        assert!(!forced.ok && forced.remedy.unwrap().contains("FERRY_TC_ATTACH"));
        let bogus = super::tc_attach("clsact", Tcx);
        assert!(
            !bogus.ok && bogus.detail.contains("\"clsact\" is not tcx, netlink or auto"),
            "{}",
            bogus.detail
        );
    }
}
