//! Outlier detection's metrics: ejections counted per destination Service
//! and endpoint (`ferry_outlier_ejections_total`), and the endpoints
//! ejected right now per Service (`ferry_outlier_ejected_endpoints`). The
//! load balancer (`proxy::balance`) updates them as it ejects and returns
//! endpoints.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EjectionLabels {
    /// `namespace/name` of the Service.
    pub destination_service: String,
    /// `ip:port` of the endpoint.
    pub endpoint: String,
    /// `consecutive_5xx`, `consecutive_gateway` or `consecutive_local_origin`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub destination_service: String,
}

#[derive(Clone, Debug, Default)]
pub struct OutlierMetrics {
    pub ejections: Family<EjectionLabels, Counter>,
    pub ejected: Family<ServiceLabels, Gauge>,
}

impl OutlierMetrics {
    pub fn register(r: &mut Registry) -> Self {
        let m = Self::default();
        r.register(
            "ferry_outlier_ejections",
            "Endpoints ejected by outlier detection, by destination Service, endpoint and reason",
            m.ejections.clone(),
        );
        r.register(
            "ferry_outlier_ejected_endpoints",
            "Endpoints ejected by outlier detection now, by destination Service",
            m.ejected.clone(),
        );
        m
    }
}
