//! The endpoint name a container gets (pure). The agent decides with it, so that every
//! plugin version on a host names a container the same way.
//!
//! Endpoint names are DNS labels (the embedded DNS answers them, and they name the
//! namespace under `/run/netns`). The runtime's container name is used when it passes one
//! (`K8S_POD_NAME` in `CNI_ARGS`: kubelet and podman do), made a label: lowercased, every
//! other character `-`, trimmed, cut at 63. Otherwise the container ID: its first 12
//! characters when it is a long hex ID (the short ID `podman ps` and `docker ps` show),
//! else the whole ID made a label the same way.

/// Longest DNS label.
const MAX_LABEL: usize = 63;
/// Length of a short container ID.
const SHORT_ID: usize = 12;

/// 1–63 characters of `a-z 0-9 -`, not starting or ending with `-` (the model's rule; this
/// crate stays free of the model's dependencies).
pub fn is_dns_label(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_LABEL
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// `s` made a DNS label, or `None` if nothing usable is left.
fn to_label(s: &str) -> Option<String> {
    let mapped: String = s
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .collect();
    let cut: String = mapped.trim_matches('-').chars().take(MAX_LABEL).collect();
    let label = cut.trim_end_matches('-').to_string();
    // All digits would read as a number to resolvers (`getent hosts 1234`).
    let label = if label.bytes().all(|b| b.is_ascii_digit()) {
        format!("c-{label}").chars().take(MAX_LABEL).collect()
    } else {
        label
    };
    is_dns_label(&label).then_some(label)
}

/// The endpoint name for a container named `pod_name` (if the runtime passed one) with
/// ID `container_id` (never empty: the plugin checks).
pub fn endpoint_name(pod_name: Option<&str>, container_id: &str) -> String {
    if let Some(name) = pod_name.and_then(to_label) {
        return name;
    }
    let long_hex =
        container_id.len() > SHORT_ID && container_id.bytes().all(|b| b.is_ascii_hexdigit());
    let id = if long_hex { &container_id[..SHORT_ID] } else { container_id };
    to_label(id).unwrap_or_else(|| "c".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtimes_name_is_made_a_label() {
        assert_eq!(endpoint_name(Some("web1"), "abc"), "web1");
        assert_eq!(endpoint_name(Some("My_Box.1"), "abc"), "my-box-1");
        assert_eq!(endpoint_name(Some("_front_"), "abc"), "front");
        assert_eq!(endpoint_name(Some("1234"), "abc"), "c-1234");
        let long = "a".repeat(70) + "-b";
        assert_eq!(endpoint_name(Some(&long), "abc"), "a".repeat(63));
        assert_eq!(endpoint_name(Some(&format!("{}_x", "a".repeat(62))), "abc"), "a".repeat(62));
        for name in ["web1", "My_Box.1", "x.y.z", "ünïcode", "a--b"] {
            assert!(is_dns_label(&endpoint_name(Some(name), "abc")), "{name}");
        }
    }

    #[test]
    fn without_a_name_the_container_id_is_used() {
        let id = "769efd9c47723aea1259647e04b5fe192a6b3da3efbb3be8a3befe552a557541";
        assert_eq!(endpoint_name(None, id), "769efd9c4772");
        assert_eq!(endpoint_name(Some(""), id), "769efd9c4772");
        assert_eq!(endpoint_name(Some("___"), id), "769efd9c4772");
        assert_eq!(endpoint_name(None, "k8s_POD.x-1"), "k8s-pod-x-1");
        assert_eq!(endpoint_name(None, "123456789012345"), "c-123456789012");
        assert_eq!(endpoint_name(None, "_"), "c");
    }

    #[test]
    fn labels_follow_the_model_rule() {
        for ok in ["a", "s1", "front-end", "0", &"a".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }
}
