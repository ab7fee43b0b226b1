//! Where the cluster comes from: a directory of YAML ([`files`]) or the
//! Kubernetes API ([`kube`]). Both produce the same [`crate::model::Cluster`].

pub mod files;
pub mod kube;
