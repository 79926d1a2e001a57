//! Parsing user strings (as they arrive from the CLI or the gRPC API) into typed values,
//! with errors that quote what the user typed.

use std::net::Ipv4Addr;
use std::time::Duration;

use ipnetwork::Ipv4Network;

use crate::ModelError;

/// A network in CIDR notation; host bits must be zero (`10.0.1.0/24`, not `10.0.1.5/24`).
pub fn cidr(s: &str) -> Result<Ipv4Network, ModelError> {
    let net: Ipv4Network = s.trim().parse().map_err(|_| ModelError::InvalidCidr(s.to_string()))?;
    if net.network() != net.ip() || !s.contains('/') {
        return Err(ModelError::InvalidCidr(s.to_string()));
    }
    Ok(net)
}

pub fn ipv4(s: &str) -> Result<Ipv4Addr, ModelError> {
    s.trim().parse().map_err(|_| ModelError::InvalidIp(s.to_string()))
}

/// An optional address: the empty string means "not given".
pub fn optional_ipv4(s: &str) -> Result<Option<Ipv4Addr>, ModelError> {
    if s.is_empty() {
        Ok(None)
    } else {
        ipv4(s).map(Some)
    }
}

/// A duration as people write one: `90s`, `15m`, `12h`, `30d` (a bare number is seconds).
pub fn duration(s: &str) -> Result<Duration, ModelError> {
    let bad = || ModelError::InvalidDuration(s.to_string());
    let t = s.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let seconds_per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(seconds_per).map(Duration::from_secs).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_requires_prefix_and_zero_host_bits() {
        assert_eq!(cidr("10.0.1.0/24").map(|n| n.prefix()), Ok(24));
        for bad in ["10.0.1.5/24", "10.0.1.0", "10.0.1.0/33", "x", "fd00::/64", ""] {
            assert_eq!(cidr(bad), Err(ModelError::InvalidCidr(bad.to_string())), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(duration(" 15m"), Ok(Duration::from_secs(900)));
        assert_eq!(duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        for bad in ["", "d", "1.5h", "10w", "-1s", "99999999999999999999d"] {
            assert_eq!(duration(bad), Err(ModelError::InvalidDuration(bad.to_string())), "{bad}");
        }
    }

    #[test]
    fn ip_errors_quote_the_input() {
        assert_eq!(ipv4("10.0.0.300"), Err(ModelError::InvalidIp("10.0.0.300".into())));
        assert_eq!(optional_ipv4(""), Ok(None));
    }
}
