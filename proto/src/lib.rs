//! The overlay gRPC API (`proto/overlay.proto`): generated types plus conversions between
//! them and the domain model. Nothing else lives here.

#[allow(clippy::all)]
pub mod pb {
    tonic::include_proto!("overlay.v1");
}

pub mod convert;
pub use pb::*;
