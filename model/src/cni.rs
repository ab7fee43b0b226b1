//! The protocol between the `ferry-cni` plugin and the node's agent: one JSON
//! request, one JSON reply, each a single line, over the agent's unix socket
//! (`--cni-socket`, docs/cni.md). The plugin asks on a pod sandbox's ADD and
//! the agent answers only once the pod is captured (or will never be, or the
//! wait the plugin allowed is over). Field names and values here are the
//! stable wire shape; an unknown field is ignored, an unknown `op` or
//! `result` is an error.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The protocol version both ends speak (`Request::version`). An agent
/// refuses another with [`Reply::Failed`].
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest request or reply line either end reads (bytes, newline
/// included); anything longer is refused, never buffered without bound.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// The longest capture wait an agent grants, whatever a request asks.
pub const MAX_WAIT_MS: u64 = 120_000;

/// What the plugin asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// A new sandbox (CNI ADD): answer once the pod is captured, or known
    /// never to be, or `timeout_ms` has passed.
    Add,
    /// CNI CHECK: the pod's capture as it is now, without waiting.
    Check,
    /// CNI DEL: the sandbox is going (best effort, idempotent).
    Del,
    /// CNI STATUS: is the agent there to take ADDs.
    Status,
}

/// The pod a request is about: what the runtime told the plugin.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PodInfo {
    /// `K8S_POD_UID` (empty when the runtime did not pass it: the agent then
    /// matches namespace and name).
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// `CNI_CONTAINERID`: the sandbox. A DEL for another sandbox of the same
    /// pod (an old one, cleaned up late) leaves the current one alone.
    pub container_id: String,
    /// `CNI_NETNS`: the sandbox's network namespace (empty when unknown, as
    /// a DEL may be).
    pub netns: String,
    /// The addresses the previous plugins gave the pod (`prevResult.ips`).
    pub ips: Vec<IpAddr>,
}

impl PodInfo {
    /// `namespace/name`, as logs show a pod.
    pub fn label(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One request line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub version: u32,
    pub op: Op,
    #[serde(default)]
    pub pod: PodInfo,
    /// With `add`: how long the agent may wait before it answers (the
    /// plugin's own deadline, less a margin so the answer arrives in time).
    /// Capped at [`MAX_WAIT_MS`].
    #[serde(default)]
    pub timeout_ms: u64,
}

/// One reply line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum Reply {
    /// Steering is on for the pod: its first connection is the mesh's.
    #[serde(rename_all = "camelCase")]
    Captured { pod_id: u32 },
    /// The pod is not to be captured (not opted in): the sandbox may start.
    #[serde(rename_all = "camelCase")]
    NotInMesh { reason: String },
    /// Not captured, and the sandbox must not start: why.
    Failed { reason: String },
    /// DEL done (also when there was nothing to do).
    Deleted,
    /// STATUS: the agent takes ADDs.
    Ready,
}

impl Reply {
    /// The reply's `result` value, as logs show it.
    pub fn result(&self) -> &'static str {
        match self {
            Reply::Captured { .. } => "captured",
            Reply::NotInMesh { .. } => "notInMesh",
            Reply::Failed { .. } => "failed",
            Reply::Deleted => "deleted",
            Reply::Ready => "ready",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_shape_round_trips() {
        let r = Request {
            version: PROTOCOL_VERSION,
            op: Op::Add,
            pod: PodInfo {
                uid: "u-1".into(),
                namespace: "default".into(),
                name: "web".into(),
                container_id: "c0ffee".into(),
                netns: "/var/run/netns/cni-1".into(),
                ips: vec!["10.1.1.5".parse().unwrap()],
            },
            timeout_ms: 29_000,
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"version":1,"op":"add","pod":{"uid":"u-1","namespace":"default","name":"web","containerId":"c0ffee","netns":"/var/run/netns/cni-1","ips":["10.1.1.5"]},"timeoutMs":29000}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        // Unknown fields are ignored; missing optional ones default.
        let min: Request = serde_json::from_str(r#"{"version":1,"op":"status","extra":true}"#).unwrap();
        assert_eq!(min.op, Op::Status);
        assert_eq!(min.pod, PodInfo::default());
        assert!(serde_json::from_str::<Request>(r#"{"version":1,"op":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"add"}"#).is_err());
    }

    #[test]
    fn reply_wire_shape_round_trips() {
        for (reply, text) in [
            (Reply::Captured { pod_id: 7 }, r#"{"result":"captured","podId":7}"#),
            (
                Reply::NotInMesh {
                    reason: "not opted in".into(),
                },
                r#"{"result":"notInMesh","reason":"not opted in"}"#,
            ),
            (
                Reply::Failed { reason: "x".into() },
                r#"{"result":"failed","reason":"x"}"#,
            ),
            (Reply::Deleted, r#"{"result":"deleted"}"#),
            (Reply::Ready, r#"{"result":"ready"}"#),
        ] {
            assert_eq!(serde_json::to_string(&reply).unwrap(), text);
            assert_eq!(serde_json::from_str::<Reply>(text).unwrap(), reply);
            assert!(text.contains(reply.result()));
        }
        assert!(serde_json::from_str::<Reply>(r#"{"result":"maybe"}"#).is_err());
    }
}
