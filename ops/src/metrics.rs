//! Prometheus metrics shared by both daemons: the text encoding of a registry, and
//! [`Scraped`], a collector for values that are read when scraped (raft status, catalog
//! sizes, counters another process keeps) rather than counted as events happen.
//!
//! Events (a proposal, a reconcile pass) use `prometheus-client`'s own counters and
//! histograms; each daemon's `metrics` module registers them.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// `Content-Type` of what [`encode`] writes: the Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The registry as Prometheus text.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in a
    // collector, and an empty scrape is what the scraper then sees.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "encoding metrics");
    }
    out
}

/// Histogram buckets for durations in seconds, 1 ms to about 33 s.
pub fn duration_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 16)
}

/// Whether a sample is a counter (only goes up, `_total` is appended to its name) or a
/// gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One value read at scrape time.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

/// Samples being gathered for one scrape. Samples of one name must share help and kind.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Samples(pub Vec<Sample>);

impl Samples {
    pub fn gauge(&mut self, name: &'static str, help: &'static str, value: f64) {
        self.gauge_with(name, help, Vec::new(), value);
    }

    pub fn gauge_with(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: Vec<(&'static str, String)>,
        value: f64,
    ) {
        self.0.push(Sample { name, help, kind: Kind::Gauge, labels, value });
    }

    pub fn counter_with(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: Vec<(&'static str, String)>,
        value: f64,
    ) {
        self.0.push(Sample { name, help, kind: Kind::Counter, labels, value });
    }

    /// The value of `name` with exactly `labels` (for tests).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .map(|s| s.value)
    }
}

/// A collector that calls `F` on every scrape and encodes what it returns.
pub struct Scraped<F>(pub F);

impl<F> fmt::Debug for Scraped<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scraped")
    }
}

impl<F> Collector for Scraped<F>
where
    F: Fn() -> Samples + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Samples(mut samples) = (self.0)();
        // One descriptor per name, its samples together (stable: first-seen order of
        // names is kept within a name's samples).
        let mut order: Vec<&'static str> = Vec::new();
        for s in &samples {
            if !order.contains(&s.name) {
                order.push(s.name);
            }
        }
        samples.sort_by_key(|s| order.iter().position(|n| *n == s.name));
        let mut i = 0;
        while i < samples.len() {
            let first = &samples[i];
            let end = samples[i..]
                .iter()
                .position(|s| s.name != first.name)
                .map_or(samples.len(), |n| i + n);
            let metric_type = match first.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            let mut metric =
                encoder.encode_descriptor(first.name, first.help, None, metric_type)?;
            for s in &samples[i..end] {
                let family = metric.encode_family(&s.labels)?;
                match s.kind {
                    Kind::Counter => ConstCounter::new(s.value.max(0.0)).encode(family)?,
                    Kind::Gauge => ConstGauge::new(s.value).encode(family)?,
                }
            }
            i = end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scraped_samples_are_grouped_by_name_and_typed() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scraped(|| {
            let mut s = Samples::default();
            s.gauge_with(
                "ov_endpoints",
                "Endpoints per network.",
                vec![("network", "a".into())],
                2.0,
            );
            s.counter_with("ov_drops", "Drops.", vec![("network", "a".into())], 5.0);
            s.gauge_with(
                "ov_endpoints",
                "Endpoints per network.",
                vec![("network", "b".into())],
                0.0,
            );
            s.gauge("ov_term", "Raft term.", 7.0);
            s
        })));
        let text = encode(&registry);
        let want = "# HELP ov_endpoints Endpoints per network.\n\
                    # TYPE ov_endpoints gauge\n\
                    ov_endpoints{network=\"a\"} 2.0\n\
                    ov_endpoints{network=\"b\"} 0.0\n\
                    # HELP ov_drops_total Drops.\n\
                    # TYPE ov_drops_total counter\n\
                    ov_drops_total{network=\"a\"} 5.0\n\
                    # HELP ov_term Raft term.\n\
                    # TYPE ov_term gauge\n\
                    ov_term 7.0\n";
        assert_eq!(text, want);
    }
}
