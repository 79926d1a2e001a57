//! The watch stream's wire form, built once and shared: every change is encoded once
//! per revision (a `WatchResponse.changes` field record) and every network's objects
//! once per version of the network, so a thousand streams send the same bytes instead
//! of each holding its own copy of the catalog. A [`Frame`] is one `WatchResponse`: a
//! few header fields written per stream around shared body bytes. Protobuf fields may
//! come in any order and repeated fields concatenate, so a frame is exactly what prost
//! would encode for the same message, and clients keep the generated types.

use bytes::{BufMut, Bytes, BytesMut};
use overlay_model::Change;
use overlay_proto::pb;
use prost::Message;
use std::sync::Arc;

/// Body bytes per snapshot chunk of a network's (or the hosts') objects.
pub const CHUNK_BYTES: usize = 32 * 1024;
/// A frame's body is cut after this many bytes (a pre-built chunk is never cut).
pub const FRAME_BYTES: usize = 32 * 1024;

/// `WatchResponse` field numbers (see proto/overlay.proto).
const REVISION: u32 = 1;
const RESET: u32 = 2;
const SNAPSHOT_DONE: u32 = 3;
const CHANGES: u32 = 4;
const CLUSTER_ID: u32 = 5;

/// Encoded bodies, each at most about [`CHUNK_BYTES`].
pub type Chunks = Arc<[Bytes]>;

/// One change as a field-4 record of a `WatchResponse`.
pub fn record(change: &Change) -> Bytes {
    let message = pb::Change::from(change);
    let mut buf = BytesMut::with_capacity(message.encoded_len() + 6);
    prost::encoding::message::encode(CHANGES, &message, &mut buf);
    buf.freeze()
}

/// Concatenates `records` into bodies of about [`CHUNK_BYTES`].
pub fn chunks(records: impl IntoIterator<Item = Bytes>) -> Chunks {
    let mut out = Vec::new();
    let mut cur = BytesMut::new();
    for r in records {
        if !cur.is_empty() && cur.len() + r.len() > CHUNK_BYTES {
            out.push(std::mem::take(&mut cur).freeze());
        }
        cur.extend_from_slice(&r);
    }
    if !cur.is_empty() {
        out.push(cur.freeze());
    }
    out.into()
}

/// One `WatchResponse` on its way out.
#[derive(Debug, Clone, Default)]
pub struct Frame {
    pub revision: u64,
    pub reset: bool,
    pub snapshot_done: bool,
    pub cluster_id: Arc<str>,
    /// Change records, shared with other streams.
    pub body: Vec<Bytes>,
}

impl Frame {
    pub fn body_len(&self) -> usize {
        self.body.iter().map(Bytes::len).sum()
    }

    /// The bytes prost would produce for the same message.
    pub fn encode(&self, dst: &mut impl BufMut) {
        use prost::encoding::{bool as pbool, uint64};
        if self.revision != 0 {
            uint64::encode(REVISION, &self.revision, dst);
        }
        if self.reset {
            pbool::encode(RESET, &self.reset, dst);
        }
        if self.snapshot_done {
            pbool::encode(SNAPSHOT_DONE, &self.snapshot_done, dst);
        }
        for b in &self.body {
            dst.put_slice(b);
        }
        if !self.cluster_id.is_empty() {
            let id = self.cluster_id.as_bytes();
            prost::encoding::encode_key(
                CLUSTER_ID,
                prost::encoding::WireType::LengthDelimited,
                dst,
            );
            prost::encoding::encode_varint(id.len() as u64, dst);
            dst.put_slice(id);
        }
    }

    pub fn encoded_len(&self) -> usize {
        use prost::encoding::{bool as pbool, uint64};
        let mut n = self.body_len();
        if self.revision != 0 {
            n += uint64::encoded_len(REVISION, &self.revision);
        }
        if self.reset {
            n += pbool::encoded_len(RESET, &self.reset);
        }
        if self.snapshot_done {
            n += pbool::encoded_len(SNAPSHOT_DONE, &self.snapshot_done);
        }
        if !self.cluster_id.is_empty() {
            let len = self.cluster_id.len();
            n += prost::encoding::key_len(CLUSTER_ID)
                + prost::encoding::encoded_len_varint(len as u64)
                + len;
        }
        n
    }

    /// The generated type, for callers that want one (the trait method, tests).
    pub fn to_message(&self) -> Result<pb::WatchResponse, prost::DecodeError> {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut buf);
        pb::WatchResponse::decode(buf.freeze())
    }
}

/// Cuts a sequence of bodies into frames at `revision`: incremental ones, or (with
/// `snapshot`) a snapshot, whose first frame has `reset` and last `snapshot_done` (one
/// frame with both when there is nothing to send).
pub fn frames(
    revision: u64,
    cluster_id: &Arc<str>,
    bodies: impl IntoIterator<Item = Bytes>,
    snapshot: bool,
) -> Vec<Frame> {
    let blank = || Frame { revision, cluster_id: cluster_id.clone(), ..Frame::default() };
    let mut out = Vec::new();
    let mut cur = blank();
    let mut cur_len = 0;
    for b in bodies {
        if !cur.body.is_empty() && cur_len + b.len() > FRAME_BYTES {
            out.push(std::mem::replace(&mut cur, blank()));
            cur_len = 0;
        }
        cur_len += b.len();
        cur.body.push(b);
    }
    if !cur.body.is_empty() || (snapshot && out.is_empty()) {
        out.push(cur);
    }
    if snapshot {
        if let Some(first) = out.first_mut() {
            first.reset = true;
        }
        if let Some(last) = out.last_mut() {
            last.snapshot_done = true;
        }
    }
    out
}

/// A progress message: no changes, the revision the watcher is now at.
/// The frames of the changes of the revisions after `before` up to `after`. Only the
/// last frame carries `after`; any before it carry `before`, the revision the watcher
/// already has whole, so a stream cut between them resumes from a revision it has
/// completely (what it applied of the rest comes again, and applying twice changes
/// nothing).
pub fn live_frames(
    before: u64,
    after: u64,
    cluster_id: &Arc<str>,
    bodies: impl IntoIterator<Item = Bytes>,
) -> Vec<Frame> {
    let mut out = frames(after, cluster_id, bodies, false);
    let last = out.len().saturating_sub(1);
    for f in &mut out[..last] {
        f.revision = before;
    }
    out
}

pub fn progress(revision: u64, cluster_id: &Arc<str>) -> Frame {
    Frame { revision, cluster_id: cluster_id.clone(), ..Frame::default() }
}

/// The codec of the Watch method as this server serves it: requests decoded with prost,
/// responses written from [`Frame`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchCodec;

#[derive(Debug, Clone, Copy, Default)]
pub struct FrameEncoder;

#[derive(Debug, Clone, Copy, Default)]
pub struct RequestDecoder;

impl tonic::codec::Codec for WatchCodec {
    type Encode = Frame;
    type Decode = pb::WatchRequest;
    type Encoder = FrameEncoder;
    type Decoder = RequestDecoder;

    fn encoder(&mut self) -> FrameEncoder {
        FrameEncoder
    }

    fn decoder(&mut self) -> RequestDecoder {
        RequestDecoder
    }
}

impl tonic::codec::Encoder for FrameEncoder {
    type Item = Frame;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Frame,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.reserve(item.encoded_len());
        item.encode(dst);
        Ok(())
    }
}

impl tonic::codec::Decoder for RequestDecoder {
    type Item = pb::WatchRequest;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<pb::WatchRequest>, tonic::Status> {
        pb::WatchRequest::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::invalid_argument(format!("bad watch request: {e}")))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use overlay_model::{Host, HostStatus};

    fn host(i: u32) -> Change {
        Change::PutHost(Host {
            name: format!("host-{i}"),
            underlay_ip: std::net::Ipv4Addr::from(0x0a00_0000 + i),
            underlay_mtu: 1500,
            status: HostStatus::Ready,
            status_changed_ms: 0,
            underlay_prefix: 24,
        })
    }

    #[test]
    fn live_frames_carry_the_new_revision_on_the_last_frame_only() {
        let id: Arc<str> = Arc::from("c");
        let changes: Vec<Change> = (0..3000).map(host).collect();
        let list = live_frames(7, 12, &id, chunks(changes.iter().map(record)).iter().cloned());
        assert!(list.len() > 1);
        let (last, rest) = list.split_last().unwrap();
        assert_eq!(last.revision, 12);
        assert!(rest.iter().all(|f| f.revision == 7 && !f.reset && !f.snapshot_done));
        let one = live_frames(7, 8, &id, [record(&changes[0])]);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].revision, 8);
        assert!(live_frames(7, 8, &id, std::iter::empty()).is_empty());
    }

    #[test]
    fn frames_decode_as_the_generated_message() {
        let changes: Vec<Change> = (0..3000).map(host).collect();
        let bodies = chunks(changes.iter().map(record));
        assert!(bodies.len() > 1 && bodies.iter().all(|b| b.len() <= CHUNK_BYTES));
        let id: Arc<str> = Arc::from("abc");
        let list = frames(42, &id, bodies.iter().cloned(), true);
        assert!(list.len() > 1);
        let mut seen = Vec::new();
        for (i, f) in list.iter().enumerate() {
            let m = f.to_message().unwrap();
            assert_eq!((m.revision, m.cluster_id.as_str()), (42, "abc"));
            assert_eq!(m.reset, i == 0);
            assert_eq!(m.snapshot_done, i == list.len() - 1);
            let mut direct = BytesMut::new();
            f.encode(&mut direct);
            assert_eq!(direct.len(), f.encoded_len());
            assert_eq!(direct.freeze(), m.encode_to_vec(), "same bytes as prost");
            seen.extend(m.changes.iter().map(|c| Change::try_from(c).unwrap()));
        }
        assert_eq!(seen, changes);
    }

    #[test]
    fn an_empty_snapshot_is_one_frame_and_nothing_else_is_none() {
        let id: Arc<str> = Arc::from("");
        let list = frames(5, &id, Vec::new(), true);
        assert_eq!(list.len(), 1);
        assert!(list[0].reset && list[0].snapshot_done);
        assert!(frames(5, &id, Vec::new(), false).is_empty());
        let p = progress(9, &id).to_message().unwrap();
        assert_eq!((p.revision, p.changes.len(), p.reset), (9, 0, false));
    }
}
