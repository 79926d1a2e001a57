//! Parsing user strings (as they arrive from the CLI or the gRPC API) into typed values,
//! with errors that quote what the user typed.

use std::net::Ipv4Addr;

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
    fn ip_errors_quote_the_input() {
        assert_eq!(ipv4("10.0.0.300"), Err(ModelError::InvalidIp("10.0.0.300".into())));
        assert_eq!(optional_ipv4(""), Ok(None));
    }
}
