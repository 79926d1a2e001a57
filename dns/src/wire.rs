//! The DNS wire format, hand-rolled for the little we need.
//!
//! Why not a DNS crate: the server answers a handful of record types for names it
//! already holds, and every query arrives from a container we do not trust. A parser
//! that only understands one question plus an optional EDNS0 OPT record, copies
//! nothing to the heap and rejects anything odd is smaller to audit, faster (no
//! allocation per query) and cheaper to build than a general message model.
//!
//! Everything here is pure and defensive: every read is bounds-checked, compression
//! pointers must point strictly backwards (so a name can never loop), names longer than
//! 255 bytes, labels longer than 63, reserved label types, several OPT records and
//! oversized packets are errors — never a panic.

use std::net::Ipv4Addr;

use thiserror::Error;

/// Size of the fixed DNS header.
pub const HEADER_LEN: usize = 12;
/// The largest query we accept, UDP or TCP. Real queries are under 300 bytes; anything
/// bigger is junk or an attack and gets FORMERR.
pub const MAX_QUERY_LEN: usize = 4096;
/// The largest response a plain (non-EDNS) UDP client accepts.
pub const CLASSIC_UDP_LIMIT: usize = 512;
/// The largest UDP response we send however large a buffer the client advertises.
pub const MAX_UDP_RESPONSE: usize = 4096;
/// The UDP payload size we advertise in our own OPT record (the DNS flag day value,
/// which avoids IP fragmentation on any sane path).
pub const ADVERTISED_UDP_SIZE: u16 = 1232;
/// The largest response over TCP (the length prefix is 16 bits).
pub const MAX_TCP_RESPONSE: usize = 65_535;
/// Longest name in wire form, root label included (RFC 1035 §2.3.4).
pub const MAX_NAME_LEN: usize = 255;
/// Longest label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;
/// Compression pointers followed in one name at most. Pointers must already move
/// strictly backwards, so this is belt and braces.
const MAX_POINTER_HOPS: usize = 64;

pub const TYPE_A: u16 = 1;
pub const TYPE_PTR: u16 = 12;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_ANY: u16 = 255;
pub const CLASS_IN: u16 = 1;
pub const CLASS_ANY: u16 = 255;
/// The only opcode we implement: a standard query.
pub const OPCODE_QUERY: u8 = 0;

const FLAG_QR: u16 = 0x8000;
const FLAG_AA: u16 = 0x0400;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;
const FLAG_CD: u16 = 0x0010;
/// The DNSSEC OK bit in the OPT record's flags.
const EDNS_DO: u16 = 0x8000;

/// Why a packet is not a query we can parse. All of these make the server answer
/// FORMERR when the header is readable, or drop the packet when it is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WireError {
    /// The packet is shorter than a DNS header.
    #[error("packet of {0} bytes is shorter than a DNS header")]
    TooShort(usize),
    /// The packet is bigger than any query we accept.
    #[error("packet of {0} bytes is bigger than the {MAX_QUERY_LEN}-byte limit")]
    Oversized(usize),
    /// The packet is a response, not a query: never answered, so two servers can't
    /// bounce packets between each other forever.
    #[error("packet is a response, not a query")]
    IsResponse,
    /// A query must hold exactly one question.
    #[error("query holds {0} questions, not 1")]
    QuestionCount(u16),
    /// A field runs past the end of the packet.
    #[error("packet is truncated at byte {0}")]
    Truncated(usize),
    /// A label longer than 63 bytes.
    #[error("label longer than {MAX_LABEL_LEN} bytes")]
    LabelTooLong,
    /// A name longer than 255 bytes.
    #[error("name longer than {MAX_NAME_LEN} bytes")]
    NameTooLong,
    /// A label type other than a plain label or a compression pointer.
    #[error("reserved label type {0:#04x}")]
    BadLabelType(u8),
    /// A compression pointer that does not point strictly backwards.
    #[error("compression pointer at byte {at} to byte {target} does not point backwards")]
    BadPointer { at: usize, target: usize },
    /// Too many compression pointers in one name.
    #[error("more than {MAX_POINTER_HOPS} compression pointers in one name")]
    TooManyPointers,
    /// More than one OPT record (RFC 6891 §6.1.1).
    #[error("more than one OPT record")]
    MultipleOpt,
    /// An OPT record whose owner is not the root.
    #[error("OPT record owned by a name other than the root")]
    BadOptOwner,
}

/// Response codes we send. `BadVers` is an extended code carried half in the OPT record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rcode {
    NoError,
    FormErr,
    ServFail,
    NxDomain,
    NotImp,
    Refused,
    /// EDNS version not supported (RFC 6891): only valid when the query had an OPT.
    BadVers,
}

impl Rcode {
    /// The full (possibly extended) code.
    pub fn code(self) -> u16 {
        match self {
            Rcode::NoError => 0,
            Rcode::FormErr => 1,
            Rcode::ServFail => 2,
            Rcode::NxDomain => 3,
            Rcode::NotImp => 4,
            Rcode::Refused => 5,
            Rcode::BadVers => 16,
        }
    }
}

/// The EDNS0 parameters of a query's OPT record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    /// The UDP payload size the client can take (values under 512 mean 512).
    pub udp_size: u16,
    pub version: u8,
    pub dnssec_ok: bool,
}

/// A name in uncompressed wire form (length-prefixed labels ending with the root), as
/// the client spelled it: the case is kept so the question can be echoed exactly (some
/// resolvers randomise case as a defence against spoofing).
#[derive(Clone, Copy)]
pub struct Name {
    buf: [u8; MAX_NAME_LEN],
    len: u8,
    labels: u8,
}

impl Name {
    fn empty() -> Name {
        Name { buf: [0; MAX_NAME_LEN], len: 0, labels: 0 }
    }

    /// Appends one label; the root is added by `finish`.
    fn push(&mut self, label: &[u8]) -> Result<(), WireError> {
        if label.len() > MAX_LABEL_LEN {
            return Err(WireError::LabelTooLong);
        }
        let start = usize::from(self.len);
        // label length byte + label + the final root byte must still fit
        let end = start + 1 + label.len();
        if end + 1 > MAX_NAME_LEN {
            return Err(WireError::NameTooLong);
        }
        self.buf[start] = label.len() as u8;
        self.buf[start + 1..end].copy_from_slice(label);
        self.len = end as u8;
        self.labels += 1;
        Ok(())
    }

    fn finish(&mut self) {
        let at = usize::from(self.len);
        // `push` keeps room for this byte.
        if let Some(b) = self.buf.get_mut(at) {
            *b = 0;
            self.len += 1;
        }
    }

    /// Builds a name from dotted text (`web.frontend` or `web.frontend.`). For tests and
    /// the client side; the server only ever parses names off the wire.
    pub fn from_dotted(text: &str) -> Result<Name, WireError> {
        let mut name = Name::empty();
        let trimmed = text.strip_suffix('.').unwrap_or(text);
        if !trimmed.is_empty() {
            for label in trimmed.split('.') {
                if label.is_empty() {
                    return Err(WireError::BadLabelType(0));
                }
                name.push(label.as_bytes())?;
            }
        }
        name.finish();
        Ok(name)
    }

    /// The name in wire form, root label included.
    pub fn wire(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }

    /// Number of labels, the root not counted.
    pub fn label_count(&self) -> usize {
        usize::from(self.labels)
    }

    /// The labels from left to right, without the root.
    pub fn labels(&self) -> Labels<'_> {
        Labels { rest: self.wire() }
    }

    /// The name as dotted text without the trailing dot (lossy for non-UTF-8 bytes);
    /// for logs and tests.
    pub fn to_dotted(&self) -> String {
        let mut out = String::new();
        for (i, label) in self.labels().enumerate() {
            if i > 0 {
                out.push('.');
            }
            out.push_str(&String::from_utf8_lossy(label));
        }
        out
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.to_dotted())
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        self.wire() == other.wire()
    }
}

impl Eq for Name {}

/// Iterator over the labels of a [`Name`].
pub struct Labels<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Labels<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        let (&len, tail) = self.rest.split_first()?;
        let len = usize::from(len);
        if len == 0 || tail.len() < len {
            return None;
        }
        let (label, rest) = tail.split_at(len);
        self.rest = rest;
        Some(label)
    }
}

/// A parsed query. Borrows the packet so the forwarding path can pass it on unchanged.
#[derive(Debug, Clone)]
pub struct Query<'a> {
    /// The whole packet as received.
    pub packet: &'a [u8],
    pub id: u16,
    pub opcode: u8,
    /// Recursion desired: echoed in the response.
    pub rd: bool,
    /// Checking disabled: echoed in the response.
    pub cd: bool,
    pub name: Name,
    pub qtype: u16,
    pub qclass: u16,
    /// Where the question section ends in `packet`.
    pub question_end: usize,
    pub edns: Option<Edns>,
}

impl Query<'_> {
    /// The largest UDP response this client takes: 512 bytes, or its EDNS buffer size
    /// (at most [`MAX_UDP_RESPONSE`]).
    pub fn udp_limit(&self) -> usize {
        match self.edns {
            Some(e) => usize::from(e.udp_size).clamp(CLASSIC_UDP_LIMIT, MAX_UDP_RESPONSE),
            None => CLASSIC_UDP_LIMIT,
        }
    }
}

fn read_u16(packet: &[u8], at: usize) -> Result<u16, WireError> {
    match packet.get(at..at + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err(WireError::Truncated(at)),
    }
}

fn read_u32(packet: &[u8], at: usize) -> Result<u32, WireError> {
    match packet.get(at..at + 4) {
        Some(b) => Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        None => Err(WireError::Truncated(at)),
    }
}

/// Reads the (possibly compressed) name at `start`. Returns it and the offset just past
/// its bytes at `start` (not past any compression target).
pub fn read_name(packet: &[u8], start: usize) -> Result<(Name, usize), WireError> {
    let mut name = Name::empty();
    let next = walk_name(packet, start, |label| name.push(label))?;
    name.finish();
    Ok((name, next))
}

/// Skips the name at `start` without decoding it; returns the offset past it and
/// whether it was the root.
fn skip_name(packet: &[u8], start: usize) -> Result<(usize, bool), WireError> {
    let mut len = 0usize;
    let mut root = true;
    let next = walk_name(packet, start, |label| {
        root = false;
        len += 1 + label.len();
        if len + 1 > MAX_NAME_LEN {
            Err(WireError::NameTooLong)
        } else {
            Ok(())
        }
    })?;
    Ok((next, root))
}

/// Walks the labels of the name at `start`, calling `f` on each. Terminates on every
/// input: each pointer must target a byte before the lowest offset read so far.
fn walk_name(
    packet: &[u8],
    start: usize,
    mut f: impl FnMut(&[u8]) -> Result<(), WireError>,
) -> Result<usize, WireError> {
    let mut pos = start;
    let mut lowest = start;
    let mut next = None;
    let mut hops = 0;
    loop {
        let len = *packet.get(pos).ok_or(WireError::Truncated(pos))?;
        match len & 0xC0 {
            0x00 => {
                let len = usize::from(len);
                if len == 0 {
                    return Ok(next.unwrap_or(pos + 1));
                }
                let label = packet.get(pos + 1..pos + 1 + len).ok_or(WireError::Truncated(pos))?;
                f(label)?;
                pos += 1 + len;
            }
            0xC0 => {
                let low = *packet.get(pos + 1).ok_or(WireError::Truncated(pos + 1))?;
                let target = (usize::from(len & 0x3F) << 8) | usize::from(low);
                if target >= lowest {
                    return Err(WireError::BadPointer { at: pos, target });
                }
                hops += 1;
                if hops > MAX_POINTER_HOPS {
                    return Err(WireError::TooManyPointers);
                }
                if next.is_none() {
                    next = Some(pos + 2);
                }
                lowest = target;
                pos = target;
            }
            other => return Err(WireError::BadLabelType(other)),
        }
    }
}

/// Parses a query: the header, exactly one question, and the OPT record if the
/// additional section has one. Answer and authority records (which a query should not
/// have) are skipped, not trusted.
pub fn parse(packet: &[u8]) -> Result<Query<'_>, WireError> {
    if packet.len() < HEADER_LEN {
        return Err(WireError::TooShort(packet.len()));
    }
    if packet.len() > MAX_QUERY_LEN {
        return Err(WireError::Oversized(packet.len()));
    }
    let id = read_u16(packet, 0)?;
    let flags = read_u16(packet, 2)?;
    if flags & FLAG_QR != 0 {
        return Err(WireError::IsResponse);
    }
    let qdcount = read_u16(packet, 4)?;
    if qdcount != 1 {
        return Err(WireError::QuestionCount(qdcount));
    }
    let ancount = read_u16(packet, 6)?;
    let nscount = read_u16(packet, 8)?;
    let arcount = read_u16(packet, 10)?;

    let (name, mut pos) = read_name(packet, HEADER_LEN)?;
    let qtype = read_u16(packet, pos)?;
    let qclass = read_u16(packet, pos + 2)?;
    pos += 4;
    let question_end = pos;

    for _ in 0..u32::from(ancount) + u32::from(nscount) {
        pos = skip_record(packet, pos)?.0;
    }
    let mut edns = None;
    for _ in 0..arcount {
        let (next, opt) = skip_record(packet, pos)?;
        if let Some(opt) = opt {
            if edns.is_some() {
                return Err(WireError::MultipleOpt);
            }
            edns = Some(opt);
        }
        pos = next;
    }
    // Bytes after the counted records are ignored, as most servers do.

    Ok(Query {
        packet,
        id,
        opcode: ((flags >> 11) & 0x0F) as u8,
        rd: flags & FLAG_RD != 0,
        cd: flags & FLAG_CD != 0,
        name,
        qtype,
        qclass,
        question_end,
        edns,
    })
}

/// Skips one resource record; returns the offset past it and its EDNS parameters if
/// it is an OPT record.
fn skip_record(packet: &[u8], pos: usize) -> Result<(usize, Option<Edns>), WireError> {
    let (pos, root) = skip_name(packet, pos)?;
    let rtype = read_u16(packet, pos)?;
    let class = read_u16(packet, pos + 2)?;
    let ttl = read_u32(packet, pos + 4)?;
    let rdlen = usize::from(read_u16(packet, pos + 8)?);
    let end = pos + 10 + rdlen;
    if end > packet.len() {
        return Err(WireError::Truncated(pos + 10));
    }
    if rtype != TYPE_OPT {
        return Ok((end, None));
    }
    if !root {
        return Err(WireError::BadOptOwner);
    }
    let edns = Edns {
        udp_size: class,
        version: (ttl >> 16) as u8,
        dnssec_ok: (ttl as u16) & EDNS_DO != 0,
    };
    Ok((end, Some(edns)))
}

/// The records of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rdata<'a> {
    /// No answer records (NXDOMAIN, NODATA, errors).
    None,
    /// A records for the question's name, in this order.
    A(&'a [Ipv4Addr]),
    /// One PTR record for the question's name; the target in uncompressed wire form.
    Ptr(&'a [u8]),
}

/// Writes a response to `query` into `out` (cleared first): header, the question as
/// the client sent it, the answers, and an OPT record when the query had one. If the
/// whole response would exceed `limit` bytes, the answers are left out and TC is set,
/// so the client retries over TCP.
pub fn write_response(
    query: &Query<'_>,
    rcode: Rcode,
    authoritative: bool,
    rdata: Rdata<'_>,
    ttl: u32,
    limit: usize,
    out: &mut Vec<u8>,
) {
    out.clear();
    let edns = query.edns.is_some();
    let (wire_rcode, ext_rcode) = if edns {
        ((rcode.code() & 0x0F) as u8, (rcode.code() >> 4) as u8)
    } else {
        // BADVERS without an OPT cannot be expressed; it is never produced that way.
        ((rcode.code() & 0x0F) as u8, 0)
    };
    let answers = match rdata {
        Rdata::None => 0,
        Rdata::A(addrs) => addrs.len().min(usize::from(u16::MAX)),
        Rdata::Ptr(_) => 1,
    };
    let mut flags = FLAG_QR | (u16::from(query.opcode & 0x0F) << 11) | FLAG_RA;
    flags |= u16::from(wire_rcode);
    if authoritative {
        flags |= FLAG_AA;
    }
    if query.rd {
        flags |= FLAG_RD;
    }
    if query.cd {
        flags |= FLAG_CD;
    }
    write_header(out, query.id, flags, answers as u16, u16::from(edns));
    out.extend_from_slice(query.name.wire());
    out.extend_from_slice(&query.qtype.to_be_bytes());
    out.extend_from_slice(&query.qclass.to_be_bytes());
    let question_end = out.len();

    // Every answer's owner is the question name: a pointer to offset 12.
    const OWNER: [u8; 2] = [0xC0, 0x0C];
    match rdata {
        Rdata::None => {}
        Rdata::A(addrs) => {
            for ip in addrs.iter().take(answers) {
                out.extend_from_slice(&OWNER);
                out.extend_from_slice(&TYPE_A.to_be_bytes());
                out.extend_from_slice(&CLASS_IN.to_be_bytes());
                out.extend_from_slice(&ttl.to_be_bytes());
                out.extend_from_slice(&4u16.to_be_bytes());
                out.extend_from_slice(&ip.octets());
            }
        }
        Rdata::Ptr(target) => {
            out.extend_from_slice(&OWNER);
            out.extend_from_slice(&TYPE_PTR.to_be_bytes());
            out.extend_from_slice(&CLASS_IN.to_be_bytes());
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&(target.len() as u16).to_be_bytes());
            out.extend_from_slice(target);
        }
    }
    let opt_len = if edns { 11 } else { 0 };
    if out.len() + opt_len > limit {
        out.truncate(question_end);
        out[2..4].copy_from_slice(&(flags | FLAG_TC).to_be_bytes());
        out[6..8].copy_from_slice(&0u16.to_be_bytes());
    }
    if edns {
        out.push(0); // root owner
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&ADVERTISED_UDP_SIZE.to_be_bytes());
        out.push(ext_rcode);
        out.push(0); // version 0
        out.extend_from_slice(&0u16.to_be_bytes()); // flags: we never sign
        out.extend_from_slice(&0u16.to_be_bytes()); // no options
    }
}

fn write_header(out: &mut Vec<u8>, id: u16, flags: u16, ancount: u16, arcount: u16) {
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&ancount.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&arcount.to_be_bytes());
}

/// Writes a header-only error response (no question) for a packet that did not parse.
/// Returns false, writing nothing, when no response must be sent: the header is
/// unreadable, or the packet is itself a response.
pub fn write_error(packet: &[u8], rcode: Rcode, out: &mut Vec<u8>) -> bool {
    out.clear();
    let (Ok(id), Ok(flags)) = (read_u16(packet, 0), read_u16(packet, 2)) else {
        return false;
    };
    if packet.len() < HEADER_LEN || flags & FLAG_QR != 0 {
        return false;
    }
    let keep = flags & (0x7800 | FLAG_RD | FLAG_CD); // opcode, RD, CD
    let flags = FLAG_QR | keep | FLAG_RA | (rcode.code() & 0x0F);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    true
}

/// Writes a query for `name` (dotted) into `out`, with an OPT record advertising
/// `edns_size` if given. For tests, benchmarks and health checks.
pub fn write_query(
    id: u16,
    name: &str,
    qtype: u16,
    edns_size: Option<u16>,
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    let name = Name::from_dotted(name)?;
    out.clear();
    write_header(out, id, FLAG_RD, 0, u16::from(edns_size.is_some()));
    out.extend_from_slice(name.wire());
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    if let Some(size) = edns_size {
        out.push(0);
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&size.to_be_bytes());
        out.extend_from_slice(&[0; 6]);
    }
    Ok(())
}

/// The parts of a response the forwarder checks and tests look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseSummary {
    pub id: u16,
    pub truncated: bool,
    pub authoritative: bool,
    /// The full rcode, extended bits from the OPT record included.
    pub rcode: u16,
    pub question: Option<(Name, u16)>,
    pub answers: Vec<Record>,
    pub edns: Option<Edns>,
}

/// One answer record of a [`ResponseSummary`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    A(Ipv4Addr),
    /// A PTR target as dotted text.
    Ptr(String),
    /// Any other type, by number.
    Other(u16),
}

/// Reads a response defensively (same rules as [`parse`], answers decoded).
pub fn read_response(packet: &[u8]) -> Result<ResponseSummary, WireError> {
    if packet.len() < HEADER_LEN {
        return Err(WireError::TooShort(packet.len()));
    }
    let id = read_u16(packet, 0)?;
    let flags = read_u16(packet, 2)?;
    let qdcount = read_u16(packet, 4)?;
    let ancount = read_u16(packet, 6)?;
    let nscount = read_u16(packet, 8)?;
    let arcount = read_u16(packet, 10)?;
    if qdcount > 1 {
        return Err(WireError::QuestionCount(qdcount));
    }
    let mut pos = HEADER_LEN;
    let mut question = None;
    if qdcount == 1 {
        let (name, next) = read_name(packet, pos)?;
        question = Some((name, read_u16(packet, next)?));
        read_u16(packet, next + 2)?;
        pos = next + 4;
    }
    let mut answers = Vec::new();
    for _ in 0..ancount {
        let (next, _) = skip_name(packet, pos)?;
        let rtype = read_u16(packet, next)?;
        let rdlen = usize::from(read_u16(packet, next + 8)?);
        let rdata = next + 10;
        let end = rdata + rdlen;
        let bytes = packet.get(rdata..end).ok_or(WireError::Truncated(rdata))?;
        answers.push(match (rtype, bytes) {
            (TYPE_A, [a, b, c, d]) => Record::A(Ipv4Addr::new(*a, *b, *c, *d)),
            (TYPE_PTR, _) => Record::Ptr(read_name(packet, rdata)?.0.to_dotted()),
            (other, _) => Record::Other(other),
        });
        pos = end;
    }
    for _ in 0..nscount {
        pos = skip_record(packet, pos)?.0;
    }
    let mut edns = None;
    let mut ext = 0u16;
    for _ in 0..arcount {
        let (next, opt) = skip_record(packet, pos)?;
        if let Some(opt) = opt {
            if edns.is_some() {
                return Err(WireError::MultipleOpt);
            }
            // the extended rcode is the OPT TTL's first byte
            let (after_name, _) = skip_name(packet, pos)?;
            ext = u16::from(*packet.get(after_name + 4).ok_or(WireError::Truncated(after_name))?);
            edns = Some(opt);
        }
        pos = next;
    }
    Ok(ResponseSummary {
        id,
        truncated: flags & FLAG_TC != 0,
        authoritative: flags & FLAG_AA != 0,
        rcode: (ext << 4) | (flags & 0x0F),
        question,
        answers,
        edns,
    })
}

/// True if `packet` is a response (QR set) with id `id`. For the forwarder's quick
/// check before anything else.
pub fn is_response_to(packet: &[u8], id: u16) -> bool {
    matches!((read_u16(packet, 0), read_u16(packet, 2)), (Ok(i), Ok(f)) if i == id && f & FLAG_QR != 0)
}

/// True if the TC bit is set (a response too big for the transport).
pub fn is_truncated(packet: &[u8]) -> bool {
    matches!(read_u16(packet, 2), Ok(f) if f & FLAG_TC != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let mut out = Vec::new();
        write_query(0x1234, name, qtype, edns, &mut out).expect("valid name");
        out
    }

    #[test]
    fn parses_a_simple_query() {
        let pkt = query("Web.Frontend.", TYPE_A, None);
        let q = parse(&pkt).expect("parses");
        assert_eq!(q.id, 0x1234);
        assert!(q.rd);
        assert_eq!(q.opcode, OPCODE_QUERY);
        assert_eq!(q.name.to_dotted(), "Web.Frontend");
        assert_eq!(q.name.label_count(), 2);
        assert_eq!(q.qtype, TYPE_A);
        assert_eq!(q.qclass, CLASS_IN);
        assert_eq!(q.question_end, pkt.len());
        assert_eq!(q.edns, None);
        assert_eq!(q.udp_limit(), 512);
    }

    #[test]
    fn parses_edns() {
        let pkt = query("web", TYPE_A, Some(4000));
        let q = parse(&pkt).expect("parses");
        assert_eq!(q.edns, Some(Edns { udp_size: 4000, version: 0, dnssec_ok: false }));
        assert_eq!(q.udp_limit(), 4000);
        let small = query("web", TYPE_A, Some(100));
        assert_eq!(parse(&small).expect("parses").udp_limit(), 512);
        let huge = query("web", TYPE_A, Some(65000));
        assert_eq!(parse(&huge).expect("parses").udp_limit(), MAX_UDP_RESPONSE);
    }

    #[test]
    fn root_name_parses() {
        let pkt = query(".", TYPE_A, None);
        let q = parse(&pkt).expect("parses");
        assert_eq!(q.name.label_count(), 0);
        assert_eq!(q.name.wire(), &[0]);
    }

    #[test]
    fn a_response_round_trips() {
        let pkt = query("web", TYPE_A, Some(1232));
        let q = parse(&pkt).expect("parses");
        let addrs = [Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 1, 2)];
        let mut out = Vec::new();
        write_response(&q, Rcode::NoError, true, Rdata::A(&addrs), 10, 512, &mut out);
        let r = read_response(&out).expect("reads");
        assert_eq!(r.id, 0x1234);
        assert!(r.authoritative);
        assert!(!r.truncated);
        assert_eq!(r.rcode, 0);
        assert_eq!(r.question.map(|(n, t)| (n.to_dotted(), t)), Some(("web".into(), TYPE_A)));
        assert_eq!(r.answers, vec![Record::A(addrs[0]), Record::A(addrs[1])]);
        assert_eq!(r.edns.map(|e| e.udp_size), Some(ADVERTISED_UDP_SIZE));
    }

    #[test]
    fn ptr_response_round_trips() {
        let pkt = query("2.0.0.10.in-addr.arpa", TYPE_PTR, None);
        let q = parse(&pkt).expect("parses");
        let target = Name::from_dotted("web.frontend.").expect("valid");
        let mut out = Vec::new();
        write_response(&q, Rcode::NoError, true, Rdata::Ptr(target.wire()), 10, 512, &mut out);
        let r = read_response(&out).expect("reads");
        assert_eq!(r.answers, vec![Record::Ptr("web.frontend".into())]);
        assert_eq!(r.edns, None);
    }

    #[test]
    fn nxdomain_and_badvers() {
        let q_pkt = query("nope", TYPE_A, None);
        let q = parse(&q_pkt).expect("parses");
        let mut out = Vec::new();
        write_response(&q, Rcode::NxDomain, true, Rdata::None, 10, 512, &mut out);
        assert_eq!(read_response(&out).expect("reads").rcode, 3);

        let q_pkt = query("nope", TYPE_A, Some(1232));
        let q = parse(&q_pkt).expect("parses");
        write_response(&q, Rcode::BadVers, false, Rdata::None, 10, 512, &mut out);
        let r = read_response(&out).expect("reads");
        assert_eq!(r.rcode, 16);
        assert_eq!(out[3] & 0x0F, 0, "header rcode holds the low bits only");
    }

    #[test]
    fn oversize_answers_set_tc() {
        let pkt = query("many", TYPE_A, None);
        let q = parse(&pkt).expect("parses");
        let addrs: Vec<Ipv4Addr> = (0..40).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        let mut out = Vec::new();
        write_response(&q, Rcode::NoError, true, Rdata::A(&addrs), 10, 512, &mut out);
        assert!(out.len() <= 512);
        let r = read_response(&out).expect("reads");
        assert!(r.truncated);
        assert!(r.answers.is_empty());
        // the same answer fits a TCP limit
        write_response(&q, Rcode::NoError, true, Rdata::A(&addrs), 10, MAX_TCP_RESPONSE, &mut out);
        let r = read_response(&out).expect("reads");
        assert!(!r.truncated);
        assert_eq!(r.answers.len(), 40);
    }

    #[test]
    fn tc_keeps_the_opt_record() {
        let pkt = query("many", TYPE_A, Some(512));
        let q = parse(&pkt).expect("parses");
        let addrs: Vec<Ipv4Addr> = (0..31).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        let mut out = Vec::new();
        write_response(&q, Rcode::NoError, true, Rdata::A(&addrs), 10, q.udp_limit(), &mut out);
        assert!(out.len() <= 512, "{}", out.len());
        let r = read_response(&out).expect("reads");
        assert!(r.truncated);
        assert!(r.edns.is_some());
    }

    #[test]
    fn echoes_question_case() {
        let pkt = query("wEb.FrOnTeNd", TYPE_A, None);
        let q = parse(&pkt).expect("parses");
        let mut out = Vec::new();
        write_response(&q, Rcode::NoError, true, Rdata::None, 10, 512, &mut out);
        assert_eq!(&out[12..q.question_end], &pkt[12..q.question_end]);
    }

    #[test]
    fn rejects_short_and_oversized() {
        assert_eq!(parse(&[0; 11]).err(), Some(WireError::TooShort(11)));
        let mut big = query("web", TYPE_A, None);
        big.resize(MAX_QUERY_LEN + 1, 0);
        assert_eq!(parse(&big).err(), Some(WireError::Oversized(MAX_QUERY_LEN + 1)));
    }

    #[test]
    fn rejects_responses_and_question_counts() {
        let mut pkt = query("web", TYPE_A, None);
        pkt[2] |= 0x80;
        assert_eq!(parse(&pkt).err(), Some(WireError::IsResponse));
        let mut pkt = query("web", TYPE_A, None);
        pkt[5] = 2;
        assert_eq!(parse(&pkt).err(), Some(WireError::QuestionCount(2)));
        pkt[5] = 0;
        assert_eq!(parse(&pkt).err(), Some(WireError::QuestionCount(0)));
    }

    #[test]
    fn rejects_truncated_questions() {
        let pkt = query("web.frontend", TYPE_A, Some(1232));
        for cut in HEADER_LEN..pkt.len() {
            assert!(parse(&pkt[..cut]).is_err(), "cut at {cut} parsed");
        }
    }

    #[test]
    fn rejects_pointer_loops() {
        // question name is a pointer to itself
        let mut pkt = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        pkt.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
        assert_eq!(parse(&pkt).err(), Some(WireError::BadPointer { at: 12, target: 12 }));
        // forward pointer
        let mut pkt = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        pkt.extend_from_slice(&[0xC0, 14, 0, 0, 1, 0, 1]);
        assert!(matches!(parse(&pkt), Err(WireError::BadPointer { .. })));
        // a label, then a pointer back to the label: would loop without the "lowest" rule
        let mut pkt = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        pkt.extend_from_slice(&[1, b'a', 0xC0, 12, 0, 1, 0, 1]);
        assert!(matches!(parse(&pkt), Err(WireError::BadPointer { .. })));
    }

    #[test]
    fn follows_backward_pointers_in_additional_records() {
        // query "web", then an OPT, then an extra A record whose owner points at the
        // question name: legal compression.
        let mut pkt = query("web", TYPE_A, Some(1232));
        pkt[11] = 2;
        pkt.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4, 1, 2, 3, 4]);
        let q = parse(&pkt).expect("parses");
        assert_eq!(q.edns.map(|e| e.udp_size), Some(1232));
    }

    #[test]
    fn rejects_long_labels_and_names() {
        let mut pkt = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 64];
        pkt.extend_from_slice(&[b'a'; 64]);
        pkt.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert_eq!(parse(&pkt).err(), Some(WireError::BadLabelType(0x40)));
        let long = vec!["a".repeat(63); 4].join(".");
        assert_eq!(Name::from_dotted(&long).err(), Some(WireError::NameTooLong));
        let ok = ["a".repeat(63), "a".repeat(63), "a".repeat(63), "a".repeat(61)].join(".");
        assert_eq!(Name::from_dotted(&ok).map(|n| n.wire().len()).ok(), Some(255));
    }

    #[test]
    fn rejects_two_opts_and_named_opt() {
        let mut pkt = query("web", TYPE_A, Some(1232));
        pkt[11] = 2;
        pkt.extend_from_slice(&[0, 0, 41, 4, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(parse(&pkt).err(), Some(WireError::MultipleOpt));
        let mut pkt = query("web", TYPE_A, None);
        pkt[11] = 1;
        pkt.extend_from_slice(&[0xC0, 12, 0, 41, 4, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(parse(&pkt).err(), Some(WireError::BadOptOwner));
    }

    #[test]
    fn huge_record_counts_end_at_the_packet_end() {
        let mut pkt = query("web", TYPE_A, None);
        pkt[6..12].copy_from_slice(&[0xFF; 6]);
        assert!(matches!(parse(&pkt), Err(WireError::Truncated(_))));
    }

    #[test]
    fn error_responses() {
        let mut out = Vec::new();
        assert!(!write_error(&[0; 5], Rcode::FormErr, &mut out));
        let mut pkt = query("web", TYPE_A, None);
        pkt[5] = 3;
        assert!(write_error(&pkt, Rcode::FormErr, &mut out));
        let r = read_response(&out).expect("reads");
        assert_eq!((r.id, r.rcode, r.question.is_none()), (0x1234, 1, true));
        pkt[2] |= 0x80;
        assert!(!write_error(&pkt, Rcode::FormErr, &mut out), "never answer a response");
    }
}
