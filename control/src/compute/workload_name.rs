//! The workload a pod belongs to, named as Istio names it (Istio's
//! `GetDeployMetaFromPod`), so `*_workload` metrics and Kiali show
//! Deployments and StatefulSets rather than pods. A pure function of the
//! pod's metadata: no lookup of the owners themselves.

use k8s_openapi::api::core::v1::Pod;

/// The pod's workload name:
/// - a pod its controller created (`metadata.generateName` set) is named
///   after its controlling owner (`ownerReferences[].controller: true`):
///   - a ReplicaSet whose name ends in the pod's `pod-template-hash` label
///     (Argo Rollouts: `rollouts-pod-template-hash`): the Deployment (the
///     ReplicaSet's name without `-<hash>`);
///   - a ReplicationController with a `deploymentconfig` label (OpenShift):
///     that label;
///   - a Job named `<name>-<8 to 10 digits>` (what a CronJob creates): the
///     CronJob, `<name>`;
///   - anything else (StatefulSet, DaemonSet, a Job, a ReplicaSet without
///     the label, a custom controller): the owner's name;
/// - any other pod (bare, static, no controller): its own name.
///
/// As Istio, a pod without `generateName` is its own workload even with an
/// owner: a kubelet's static (mirror) pod is "owned" by its Node.
pub fn workload_name(pod: &Pod) -> String {
    let m = &pod.metadata;
    let own = m.name.clone().unwrap_or_default();
    if m.generate_name.as_deref().is_none_or(str::is_empty) {
        return own;
    }
    let Some(owner) = m.owner_references.iter().flatten().find(|r| r.controller == Some(true)) else {
        return own;
    };
    let label = |k: &str| {
        m.labels
            .as_ref()
            .and_then(|l| l.get(k))
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    };
    let name = owner.name.as_str();
    let strip_hash = |hash: &str| {
        name.ends_with(hash)
            .then(|| name.strip_suffix(&format!("-{hash}")).unwrap_or(name))
    };
    let derived = match owner.kind.as_str() {
        "ReplicaSet" => label("pod-template-hash")
            .and_then(strip_hash)
            .or_else(|| label("rollouts-pod-template-hash").and_then(strip_hash))
            .unwrap_or(name),
        "ReplicationController" => label("deploymentconfig").unwrap_or(name),
        "Job" => cron_job(name).unwrap_or(name),
        _ => name,
    };
    if derived.is_empty() {
        own
    } else {
        derived.to_owned()
    }
}

/// The CronJob that created Job `name`: `<cronjob>-<scheduled time>`, the
/// time in minutes since the epoch (8 to 10 digits, as Istio matches).
fn cron_job(name: &str) -> Option<&str> {
    let (prefix, suffix) = name.rsplit_once('-')?;
    let digits = (8..=10).contains(&suffix.len()) && suffix.bytes().all(|b| b.is_ascii_digit());
    (digits && !prefix.is_empty()).then_some(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, generate_name: Option<&str>, owner: Option<(&str, &str, bool)>, labels: &[(&str, &str)]) -> Pod {
        let mut meta = serde_json::json!({"name": name, "labels": {}});
        if let Some(g) = generate_name {
            meta["generateName"] = g.into();
        }
        for (k, v) in labels {
            meta["labels"][*k] = (*v).into();
        }
        if let Some((kind, owner, controller)) = owner {
            meta["ownerReferences"] = serde_json::json!([
                {"apiVersion": "apps/v1", "kind": "Other", "name": "not-the-controller", "uid": "x"},
                {"apiVersion": "apps/v1", "kind": kind, "name": owner, "uid": "y", "controller": controller},
            ]);
        }
        serde_json::from_value(serde_json::json!({"metadata": meta})).unwrap()
    }

    #[test]
    fn names_follow_istio() {
        let hash = &[("pod-template-hash", "6f7b8c9d4")][..];
        // (pod name, generateName, controlling owner (kind, name, controller), labels, workload)
        type Case<'a> = (
            &'a str,
            Option<&'a str>,
            Option<(&'a str, &'a str, bool)>,
            &'a [(&'a str, &'a str)],
            &'a str,
        );
        let cases: &[Case] = &[
            // Deployment -> ReplicaSet -> Pod.
            (
                "reviews-v1-6f7b8c9d4-x2x9z",
                Some("reviews-v1-6f7b8c9d4-"),
                Some(("ReplicaSet", "reviews-v1-6f7b8c9d4", true)),
                hash,
                "reviews-v1",
            ),
            // A ReplicaSet of its own (no hash label, or one it does not end with).
            ("rs-abcde", Some("rs-"), Some(("ReplicaSet", "rs", true)), &[], "rs"),
            ("rs-abcde", Some("rs-"), Some(("ReplicaSet", "rs", true)), hash, "rs"),
            // Argo Rollouts.
            (
                "web-7c9d8-q",
                Some("web-7c9d8-"),
                Some(("ReplicaSet", "web-7c9d8", true)),
                &[("rollouts-pod-template-hash", "7c9d8")],
                "web",
            ),
            ("db-0", Some("db-"), Some(("StatefulSet", "db", true)), &[], "db"),
            (
                "fluentd-x7k2p",
                Some("fluentd-"),
                Some(("DaemonSet", "fluentd", true)),
                &[],
                "fluentd",
            ),
            // A Job, and a Job a CronJob created (its scheduled minute, 8-10 digits).
            (
                "migrate-2-abcde",
                Some("migrate-2-"),
                Some(("Job", "migrate-2", true)),
                &[],
                "migrate-2",
            ),
            (
                "backup-29012345-abcde",
                Some("backup-29012345-"),
                Some(("Job", "backup-29012345", true)),
                &[],
                "backup",
            ),
            (
                "x-12345678901-a",
                Some("x-12345678901-"),
                Some(("Job", "x-12345678901", true)),
                &[],
                "x-12345678901",
            ),
            (
                "a-b-2901234567-z",
                Some("a-b-2901234567-"),
                Some(("Job", "a-b-2901234567", true)),
                &[],
                "a-b",
            ),
            (
                "-29012345-z",
                Some("-29012345-"),
                Some(("Job", "-29012345", true)),
                &[],
                "-29012345",
            ),
            // OpenShift DeploymentConfig.
            (
                "app-1-xyz",
                Some("app-1-"),
                Some(("ReplicationController", "app-1", true)),
                &[("deploymentconfig", "app")],
                "app",
            ),
            (
                "rc-xyz",
                Some("rc-"),
                Some(("ReplicationController", "rc", true)),
                &[],
                "rc",
            ),
            // Custom controllers: their name.
            (
                "vm-launcher-abc",
                Some("vm-launcher-"),
                Some(("VirtualMachineInstance", "vm", true)),
                &[],
                "vm",
            ),
            // A bare pod; an owner that is not a controller; a static pod (owned by its Node, no generateName).
            ("solo", None, None, &[], "solo"),
            (
                "solo-abc",
                Some("solo-"),
                Some(("ReplicaSet", "rs", false)),
                hash,
                "solo-abc",
            ),
            (
                "kube-apiserver-n1",
                None,
                Some(("Node", "n1", true)),
                &[],
                "kube-apiserver-n1",
            ),
            // An empty owner name: the pod's own.
            ("odd-x", Some("odd-"), Some(("StatefulSet", "", true)), &[], "odd-x"),
        ];
        for (name, gen, owner, labels, want) in cases {
            assert_eq!(
                workload_name(&pod(name, *gen, *owner, labels)),
                *want,
                "{name} {owner:?}"
            );
        }
        // Nothing from the cluster makes it panic: no metadata at all.
        assert_eq!(workload_name(&Pod::default()), "");
    }
}
