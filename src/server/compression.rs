//! Compressed streams (`Content-Encoding: gzip` or `deflate`) with no compressor per
//! connection. A stream is one deflate stream made of pieces that each end on a byte
//! boundary, so that any sequence of them is a valid stream:
//!
//! - a live event's text, compressed once per server on its own (no back-references into
//!   earlier events, then a sync flush) and shared by every connection that takes it;
//! - everything a connection renders for itself (its prelude, notices, heartbeats, the
//!   `id:` line of a connection of several endpoints, a replay, a table's rows) as stored
//!   blocks: its bytes as they are, behind a 5-byte block header, for no CPU at all.
//!
//! A connection keeps only its encoding and the running checksum of what it sent (CRC-32
//! for gzip, Adler-32 for deflate's zlib format), for the trailer that ends its stream.
//! Events compress on their own, not against the ones before, so the saving is what one
//! event's text gives: measured in BENCHMARKS.md.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, FlushCompress};

use crate::sse::RenderedEvent;

/// A content coding a stream may be sent in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `gzip` (RFC 1952).
    Gzip,
    /// `deflate`: the zlib format (RFC 1950), as HTTP defines it.
    Deflate,
}

impl Encoding {
    /// The coding to send a response in, given the request's `Accept-Encoding` values:
    /// gzip, else deflate, when the client accepts it with a weight above 0 (directly or
    /// by `*`); `None` for the response as it is.
    pub fn negotiate<'a>(accept_encoding: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let mut weights = [None::<bool>; 2];
        let mut any = None::<bool>;
        for coding in accept_encoding
            .into_iter()
            .flat_map(|value| value.split(','))
        {
            let mut parameters = coding.split(';');
            let name = parameters.next().unwrap_or("").trim();
            let accepted = parameters
                .filter_map(|parameter| parameter.trim().split_once('='))
                .find(|(key, _)| key.trim().eq_ignore_ascii_case("q"))
                .is_none_or(|(_, weight)| weight.trim().parse::<f32>().is_ok_and(|q| q > 0.0));
            let slot = if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
                &mut weights[0]
            } else if name.eq_ignore_ascii_case("deflate") {
                &mut weights[1]
            } else if name == "*" {
                &mut any
            } else {
                continue;
            };
            *slot = Some(accepted);
        }
        [Self::Gzip, Self::Deflate]
            .into_iter()
            .zip(weights)
            .find(|(_, accepted)| accepted.or(any).unwrap_or(false))
            .map(|(encoding, _)| encoding)
    }

    /// Its name in `Content-Encoding`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Deflate => "deflate",
        }
    }

    /// The bytes a stream in this coding starts with.
    fn header(self) -> &'static [u8] {
        match self {
            // Magic, deflate, no flags, no time, no extra flags, OS unknown.
            Self::Gzip => &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255],
            // Deflate with a 32 KiB window, no dictionary, default level; a multiple of 31.
            Self::Deflate => &[0x78, 0x9c],
        }
    }
}

/// One connection's side of a compressed stream: its coding and the checksum of what it
/// sent so far, with the length for gzip's trailer, in one word: 16 bytes a connection. Its
/// pieces may come from the connection's task or from the hub writing in its place, one at
/// a time (see `hub::outlet`), in the order they reach the socket.
#[derive(Debug)]
pub(crate) struct Encoder {
    encoding: Encoding,
    /// The checksum (CRC-32 for gzip, Adler-32 for deflate) in the high half, the bytes
    /// counted modulo 2^32 in the low half.
    checksum: AtomicU64,
}

impl Encoder {
    pub(crate) fn new(encoding: Encoding) -> Self {
        let start = match encoding {
            Encoding::Gzip => 0,
            Encoding::Deflate => adler2::Adler32::new().checksum(),
        };
        Self {
            encoding,
            checksum: AtomicU64::new(u64::from(start) << 32),
        }
    }

    pub(crate) fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// The checksum and the length counted, modulo 2^32.
    fn checksum(&self) -> (u32, u32) {
        let word = self.checksum.load(Relaxed);
        ((word >> 32) as u32, word as u32)
    }

    /// Counts `text`, sent compressed from shared bytes, in the checksum.
    pub(crate) fn count(&self, text: &[u8]) {
        // The pieces come one at a time; the loop only keeps a racing update from being
        // lost, were they ever not to.
        let _ = self.checksum.fetch_update(Relaxed, Relaxed, |word| {
            let (sum, length) = ((word >> 32) as u32, word as u32);
            let sum = match self.encoding {
                Encoding::Gzip => {
                    let mut hasher = crc32fast::Hasher::new_with_initial(sum);
                    hasher.update(text);
                    hasher.finalize()
                }
                Encoding::Deflate => {
                    let mut hasher = adler2::Adler32::from_checksum(sum);
                    hasher.write_slice(text);
                    hasher.checksum()
                }
            };
            // Modulo 2^32, as gzip's trailer counts.
            let length = length.wrapping_add(text.len() as u32);
            Some(u64::from(sum) << 32 | u64::from(length))
        });
    }

    /// Appends the stream's header, then `text` (its first bytes).
    pub(crate) fn start(&self, text: &[u8], out: &mut BytesMut) {
        out.put_slice(self.encoding.header());
        self.put_stored(text, out);
    }

    /// Appends `text`, rendered for this connection alone, as stored blocks.
    pub(crate) fn put_stored(&self, text: &[u8], out: &mut BytesMut) {
        self.count(text);
        stored(text, out);
    }

    /// `text`, rendered for this connection alone, as stored blocks.
    pub(crate) fn stored(&self, text: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(text.len() + text.len() / MAX_STORED * 5 + 5);
        self.put_stored(text, &mut out);
        out.freeze()
    }

    /// Appends a live event as the pieces every connection of one endpoint shares.
    pub(crate) fn put_event(&self, event: &SharedEvent, out: &mut BytesMut) {
        self.count(event.text.bytes());
        out.put_slice(event.deflated());
    }

    /// Appends a live event after an `id:` line of this connection's own: the line as a
    /// stored block, the rest from the compressed bytes every connection shares.
    pub(crate) fn put_event_with_id(
        &self,
        id_line: &[u8],
        event: &SharedEvent,
        out: &mut BytesMut,
    ) {
        self.put_stored(id_line, out);
        self.count(event.text.tail());
        out.put_slice(event.deflated_tail());
    }

    /// The stream's last bytes: an empty final block, then the checksum (and for gzip the
    /// length, modulo 2^32).
    pub(crate) fn finish(&self) -> Vec<u8> {
        // BFINAL set, fixed Huffman codes, the end-of-block code: after a byte boundary,
        // these two bytes.
        let mut out = vec![0x03, 0x00];
        let (sum, length) = self.checksum();
        match self.encoding {
            Encoding::Gzip => {
                out.extend_from_slice(&sum.to_le_bytes());
                out.extend_from_slice(&length.to_le_bytes());
            }
            Encoding::Deflate => out.extend_from_slice(&sum.to_be_bytes()),
        }
        out
    }
}

/// A live event with its compressed forms, each made once, by the first connection that
/// asks for it.
#[derive(Debug)]
pub(crate) struct SharedEvent {
    pub(crate) text: RenderedEvent,
    /// The whole event, for connections of one endpoint.
    whole: OnceLock<Bytes>,
    /// The event without its `id:` line, for connections of several endpoints.
    tail: OnceLock<Bytes>,
}

impl SharedEvent {
    pub(crate) fn new(text: RenderedEvent) -> Self {
        Self {
            text,
            whole: OnceLock::new(),
            tail: OnceLock::new(),
        }
    }

    /// The whole event as deflate blocks, shared.
    pub(crate) fn deflated(&self) -> &Bytes {
        self.whole.get_or_init(|| deflate(self.text.bytes()))
    }

    /// The whole event as a stream with `encoder` sends it: compressed, or as it is.
    pub(crate) fn bytes_for(&self, encoder: Option<&Encoder>) -> &Bytes {
        match encoder {
            Some(_) => self.deflated(),
            None => self.text.bytes(),
        }
    }

    /// The event without its `id:` line as deflate blocks, shared.
    fn deflated_tail(&self) -> &Bytes {
        self.tail.get_or_init(|| deflate(self.text.tail()))
    }
}

/// The most bytes a stored block holds.
const MAX_STORED: usize = 0xffff;

/// Appends `text` as stored blocks, each not final: a byte-aligned header, the length and
/// its complement, the bytes.
fn stored(text: &[u8], out: &mut BytesMut) {
    for block in text.chunks(MAX_STORED) {
        // The length fits 16 bits: chunks of at most MAX_STORED.
        let length = u16::try_from(block.len()).unwrap_or(u16::MAX);
        out.put_u8(0);
        out.put_u16_le(length);
        out.put_u16_le(!length);
        out.put_slice(block);
    }
}

thread_local! {
    /// One compressor per thread, reset for each event, and its output buffer: making one
    /// allocates and clears its tables, which would cost more than compressing a small
    /// event. Each event's bytes are copied out of the buffer at their size.
    static COMPRESSOR: RefCell<(Compress, Vec<u8>)> =
        RefCell::new((Compress::new(Compression::default(), false), Vec::new()));
}

/// Appends `text` compressed on its own as raw deflate blocks that end on a byte boundary
/// and are not final (a sync flush), so that they may be followed by anything.
fn deflate(text: &[u8]) -> Bytes {
    COMPRESSOR.with_borrow_mut(|(compressor, buffer)| {
        compressor.reset();
        buffer.clear();
        // Room for the worst case, stored blocks, so that one call does it all.
        buffer.reserve(text.len() + text.len() / MAX_STORED * 5 + 64);
        loop {
            let consumed = usize::try_from(compressor.total_in()).unwrap_or(text.len());
            let input = text.get(consumed..).unwrap_or_default();
            if compressor
                .compress_vec(input, buffer, FlushCompress::Sync)
                .is_err()
            {
                // miniz_oxide fails only when misused; the text as stored blocks is still
                // a correct piece of the stream.
                let mut plain = BytesMut::new();
                stored(text, &mut plain);
                return plain.freeze();
            }
            // The flush is complete once all the input went in and it left room to spare.
            if usize::try_from(compressor.total_in()).is_ok_and(|read| read == text.len())
                && buffer.len() < buffer.capacity()
            {
                break;
            }
            buffer.reserve(buffer.capacity());
        }
        let deflated = Bytes::copy_from_slice(buffer);
        // A huge event's room is not kept for the thread's life.
        if buffer.capacity() > 1 << 20 {
            *buffer = Vec::new();
        }
        deflated
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Read;

    use super::*;
    use fjord_bus::StreamId;

    fn event(ms: u64, data: &str) -> SharedEvent {
        SharedEvent::new(RenderedEvent::new(
            StreamId { ms, seq: 0 },
            "orders",
            data.as_bytes(),
        ))
    }

    /// A whole stream in `encoding` decoded, its trailer's checksum checked.
    pub(crate) fn decode(encoding: Encoding, bytes: &[u8]) -> String {
        let mut text = String::new();
        match encoding {
            Encoding::Gzip => flate2::read::GzDecoder::new(bytes).read_to_string(&mut text),
            Encoding::Deflate => flate2::read::ZlibDecoder::new(bytes).read_to_string(&mut text),
        }
        .expect("a valid stream, checksum included");
        text
    }

    #[test]
    fn shared_events_and_a_connection_s_own_bytes_make_one_valid_stream() {
        let order = r#"{"topic":"orders","key":"order-1","value":{"status":"placed","total_cents":1250,"items":["tea","tea","cake"]}}"#;
        let events = [event(10, order), event(11, order), event(12, "{}")];
        for encoding in [Encoding::Gzip, Encoding::Deflate] {
            let encoder = Encoder::new(encoding);
            let mut out = BytesMut::new();
            encoder.start(b"retry: 2000\nid: 5-0\n\n", &mut out);
            encoder.put_event(&events[0], &mut out);
            encoder.put_stored(b": heartbeat\n\n", &mut out);
            encoder.put_event_with_id(b"id: 11-0_3-0\n", &events[1], &mut out);
            // What the hub wrote in the task's place: counted, the shared bytes sent.
            encoder.count(events[2].text.bytes());
            out.put_slice(events[2].deflated());
            out.put_slice(&encoder.finish());
            let expected = format!(
                "retry: 2000\nid: 5-0\n\nid: 10-0\nevent: orders\ndata: {order}\n\n: heartbeat\n\nid: 11-0_3-0\nevent: orders\ndata: {order}\n\nid: 12-0\nevent: orders\ndata: {{}}\n\n"
            );
            assert_eq!(decode(encoding, &out), expected, "{encoding:?}");
        }
    }

    #[test]
    fn every_piece_decodes_as_soon_as_it_arrives() {
        // A browser shows an event once its bytes arrive, not at the stream's end: each
        // piece must decode whole without what comes after it.
        let shared = event(10, r#"{"value":"a record"}"#);
        let encoder = Encoder::new(Encoding::Gzip);
        let mut out = BytesMut::new();
        encoder.start(b"retry: 2000\n\n", &mut out);
        encoder.put_event(&shared, &mut out);
        let mut decoder = flate2::Decompress::new(false);
        let mut text = Vec::with_capacity(4096);
        decoder
            .decompress_vec(&out[10..], &mut text, flate2::FlushDecompress::None)
            .expect("valid");
        assert_eq!(
            String::from_utf8(text).expect("utf-8"),
            "retry: 2000\n\nid: 10-0\nevent: orders\ndata: {\"value\":\"a record\"}\n\n"
        );
    }

    #[test]
    fn a_large_event_and_long_own_text_cross_block_limits() {
        let big = format!("{{\"blob\":\"{}\"}}", "xy".repeat(100_000));
        let own = "z".repeat(200_000);
        let shared = event(1, &big);
        let encoder = Encoder::new(Encoding::Deflate);
        let mut out = BytesMut::new();
        encoder.start(own.as_bytes(), &mut out);
        encoder.put_event(&shared, &mut out);
        out.put_slice(&encoder.finish());
        let text = decode(Encoding::Deflate, &out);
        assert_eq!(text.len(), own.len() + shared.text.bytes().len());
        assert!(shared.deflated().len() < big.len() / 10, "it compressed");
    }

    #[test]
    fn gzip_s_trailer_counts_every_byte() {
        let encoder = Encoder::new(Encoding::Gzip);
        encoder.count(&[b'a'; 70_000]);
        encoder.count(b"bc");
        let trailer = encoder.finish();
        assert_eq!(trailer[6..], 70_002u32.to_le_bytes());
    }

    #[test]
    fn the_coding_is_gzip_then_deflate_as_the_client_accepts_them() {
        let negotiate = |value: &str| Encoding::negotiate([value]);
        assert_eq!(negotiate("gzip, deflate, br, zstd"), Some(Encoding::Gzip));
        assert_eq!(negotiate("deflate"), Some(Encoding::Deflate));
        assert_eq!(negotiate("br;q=1.0, gzip;q=0.5"), Some(Encoding::Gzip));
        assert_eq!(negotiate("GZIP;Q=0.1"), Some(Encoding::Gzip));
        assert_eq!(negotiate("gzip;q=0, deflate"), Some(Encoding::Deflate));
        assert_eq!(negotiate("gzip;q=0"), None);
        assert_eq!(negotiate("*"), Some(Encoding::Gzip));
        assert_eq!(negotiate("*;q=0, identity"), None);
        assert_eq!(negotiate("gzip;q=0, *"), Some(Encoding::Deflate));
        assert_eq!(negotiate("br, zstd"), None);
        assert_eq!(negotiate("identity"), None);
        assert_eq!(negotiate(""), None);
        assert_eq!(negotiate("gzip;q=nonsense"), None);
        assert_eq!(
            Encoding::negotiate(["br", "deflate"]),
            Some(Encoding::Deflate)
        );
    }
}
