//! permessage-deflate (RFC 7692; PROTOCOL.md section 12): the upgrade's
//! negotiation, one message compressed without context takeover, and a
//! client message inflated within `--max-message-bytes`.
//!
//! The gateway keeps no deflate state per connection: both directions are
//! negotiated with `no_context_takeover`, so every message is a complete raw
//! deflate stream on its own. A server message is compressed once per node
//! (by whoever builds its frame) and the same bytes go to every member that
//! negotiated the extension. The compressor and the inflater are reused per
//! thread and reset before each message.
//!
//! The deflate itself is `flate2` (miniz_oxide backend); only the RFC 7692
//! framing around it (the offer grammar, the `00 00 ff ff` tail) is here.

use std::cell::RefCell;

use clap::{Args, ValueEnum};
use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};

/// The tail a sync flush ends with; RFC 7692 strips it from every message.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Our compressor's LZ77 window, in bits (32 KiB; miniz_oxide has no other).
/// An offer with a smaller `server_max_window_bits` cannot be honoured.
const WINDOW_BITS: u8 = 15;

/// Answer when the offer did not constrain the server's window.
const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// Answer when the offer carried `server_max_window_bits=15`: RFC 7692
/// 7.1.2.1 wants the parameter echoed.
const ANSWER_WINDOW: &str = "permessage-deflate; server_no_context_takeover; \
                             client_no_context_takeover; server_max_window_bits=15";

/// `--compression`: `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// Accept permessage-deflate when the client offers it.
    On,
    /// Ignore the offer: every frame plain.
    Off,
}

/// The compression flags of `wsgate serve` (flattened into its flags).
#[derive(Debug, Clone, Args)]
pub struct CompressionArgs {
    /// `on` or `off`: accept permessage-deflate when the client offers it.
    #[arg(long = "compression", env = "WSGATE_COMPRESSION", value_enum, default_value_t = Switch::On)]
    pub compression: Switch,
    /// Smaller server frames are sent uncompressed.
    #[arg(long, env = "WSGATE_COMPRESSION_MIN_BYTES", default_value_t = 256)]
    pub compression_min_bytes: usize,
}

impl CompressionArgs {
    /// The settings a node runs with.
    pub fn settings(&self) -> Compression {
        Compression {
            enabled: self.compression == Switch::On,
            min_bytes: self.compression_min_bytes,
        }
    }
}

/// A node's compression settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    /// Accept the extension when offered.
    pub enabled: bool,
    /// Server payloads shorter than this are sent plain.
    pub min_bytes: usize,
}

impl Default for Compression {
    fn default() -> Self {
        Compression {
            enabled: true,
            min_bytes: 256,
        }
    }
}

impl Compression {
    /// The `Sec-WebSocket-Extensions` answer to an upgrade whose header
    /// values are `offers` (every line of the header, in order), or `None`
    /// when the extension is not used: compression off, not offered, or no
    /// offer we can honour. The first acceptable offer wins.
    pub fn negotiate<'a, I>(&self, offers: I) -> Option<Agreement>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        if !self.enabled {
            return None;
        }
        offers
            .into_iter()
            .filter_map(|line| std::str::from_utf8(line).ok())
            .flat_map(split_outside_quotes::<','>)
            .find_map(accept)
    }

    /// Whether a server payload of `len` bytes is sent compressed (to a
    /// connection that negotiated the extension).
    pub fn worth_compressing(&self, len: usize) -> bool {
        self.enabled && len >= self.min_bytes
    }
}

/// A negotiated permessage-deflate: the answer the 101 carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    answer: &'static str,
}

impl Agreement {
    /// The `Sec-WebSocket-Extensions` value of the 101 response.
    pub fn header_value(&self) -> &'static str {
        self.answer
    }
}

/// One extension of an offer list, e.g. `permessage-deflate;
/// client_max_window_bits`: accepted, or `None` when it is another extension
/// or carries a parameter we cannot honour (unknown, repeated, malformed, or
/// a server window below ours).
fn accept(extension: &str) -> Option<Agreement> {
    let mut parts = split_outside_quotes::<';'>(extension);
    let name = parts.next()?;
    if !name.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut seen = [false; 4];
    let mut answer = ANSWER;
    for param in parts {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k.trim(), Some(unquote(v.trim())?)),
            None => (param, None),
        };
        let slot = match key.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => 0,
            "client_no_context_takeover" if value.is_none() => 1,
            "server_max_window_bits" => {
                if window_bits(value?)? < WINDOW_BITS {
                    return None;
                }
                answer = ANSWER_WINDOW;
                2
            }
            // The client may limit its own window; our inflater takes any.
            "client_max_window_bits" => {
                if let Some(v) = value {
                    window_bits(v)?;
                }
                3
            }
            _ => return None,
        };
        if std::mem::replace(&mut seen[slot], true) {
            return None;
        }
    }
    Some(Agreement { answer })
}

/// A window size parameter: 8 to 15, digits only, no leading zero.
fn window_bits(value: &str) -> Option<u8> {
    if value.is_empty() || value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

/// A parameter value as a token or a quoted string (RFC 7692 allows both).
fn unquote(value: &str) -> Option<&str> {
    match value.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"').filter(|v| !v.contains(['"', '\\'])),
        None => Some(value),
    }
}

/// `s` split on `SEP` where it is not inside a quoted string; items trimmed,
/// empty ones (`a,,b`) skipped.
fn split_outside_quotes<const SEP: char>(s: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(s);
    std::iter::from_fn(move || loop {
        let s = rest?;
        let mut quoted = false;
        let end = s.char_indices().find_map(|(i, c)| {
            match c {
                '"' => quoted = !quoted,
                c if c == SEP && !quoted => return Some(i),
                _ => {}
            }
            None
        });
        let item = match end {
            Some(i) => {
                rest = Some(&s[i + SEP.len_utf8()..]);
                &s[..i]
            }
            None => {
                rest = None;
                s
            }
        };
        let item = item.trim();
        if !item.is_empty() {
            return Some(item);
        }
    })
}

thread_local! {
    static COMPRESSOR: RefCell<Compress> =
        RefCell::new(Compress::new(flate2::Compression::default(), false));
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// `payload` as one permessage-deflate message: a raw deflate stream
/// flushed and stripped of its `00 00 ff ff` tail, independent of any
/// other message (no context takeover).
pub fn compress(payload: &[u8]) -> Vec<u8> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        c.reset();
        // Stored blocks cost 5 bytes per 64 KiB; the flush adds at most 10.
        let mut out = Vec::with_capacity(payload.len() + payload.len() / 8192 + 64);
        loop {
            let fed = usize::try_from(c.total_in()).unwrap_or(usize::MAX);
            let ok = c
                .compress_vec(
                    &payload[fed.min(payload.len())..],
                    &mut out,
                    FlushCompress::Sync,
                )
                .is_ok();
            let fed = usize::try_from(c.total_in()).unwrap_or(usize::MAX);
            // Done when all input is in and the flush did not run out of room.
            if !ok || (fed >= payload.len() && out.len() < out.capacity()) {
                break;
            }
            out.reserve(payload.len() / 4 + 64);
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        out
    })
}

/// Why a compressed client message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// It inflates beyond `--max-message-bytes`: close 1009.
    #[error("message too big once decompressed")]
    TooBig,
    /// Not valid deflate data: close 1007.
    #[error("invalid compressed data")]
    Corrupt,
}

impl RsvError {
    /// The close reason.
    pub fn reason(self) -> &'static str {
        match self {
            RsvError::NotNegotiated => "RSV1 without permessage-deflate",
            RsvError::Control => "RSV1 on a control frame",
            RsvError::Continuation => "RSV1 on a continuation frame",
        }
    }
}

impl InflateError {
    /// The WebSocket close code this ends the connection with.
    pub fn close_code(self) -> u16 {
        match self {
            InflateError::TooBig => 1009,
            InflateError::Corrupt => 1007,
        }
    }
}

/// A compressed client message (the payloads of its frames, concatenated)
/// inflated, or an error as soon as the output would pass `limit` bytes: a
/// deflate bomb costs at most `limit` bytes of memory (plus one block of
/// slack), never what it would expand to.
pub fn inflate(compressed: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
    INFLATER.with(|d| {
        let mut d = d.borrow_mut();
        d.reset(false);
        let result = inflate_with(&mut d, compressed, limit);
        if result.is_err() {
            // Do not keep a bomb's or garbage's state around until the next use.
            d.reset(false);
        }
        result
    })
}

fn inflate_with(
    d: &mut Decompress,
    compressed: &[u8],
    limit: usize,
) -> Result<Vec<u8>, InflateError> {
    // The output may reach limit + 1 bytes: that one byte says "too big".
    let cap = limit.saturating_add(1);
    let step = 16 * 1024;
    let mut out = Vec::with_capacity(compressed.len().saturating_mul(4).clamp(64, step).min(cap));
    let total = compressed.len() + TAIL.len();
    // Every round consumes input or fills the output, both bounded.
    loop {
        if out.len() == out.capacity() {
            if out.len() >= cap {
                return Err(InflateError::TooBig);
            }
            let grow = out.len().clamp(step, 1 << 20).min(cap - out.len());
            out.reserve_exact(grow);
        }
        let fed = usize::try_from(d.total_in()).unwrap_or(usize::MAX);
        let input = match fed.checked_sub(compressed.len()) {
            None => &compressed[fed..],
            Some(i) => &TAIL[i.min(TAIL.len())..],
        };
        let before = (d.total_in(), d.total_out());
        let status = d
            .decompress_vec(input, &mut out, FlushDecompress::Sync)
            .map_err(|_| InflateError::Corrupt)?;
        if out.len() > limit {
            return Err(InflateError::TooBig);
        }
        let fed = usize::try_from(d.total_in()).unwrap_or(usize::MAX);
        let room_left = out.len() < out.capacity();
        if status == Status::StreamEnd || (fed >= total && room_left) {
            return Ok(out);
        }
        if (d.total_in(), d.total_out()) == before && room_left {
            // No progress with input and room: the stream is broken.
            return Err(InflateError::Corrupt);
        }
    }
}

/// What a frame's RSV1 bit means (RFC 7692 section 6): the frame kinds the
/// rule tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// The first frame of a text or binary message.
    First,
    /// A continuation frame.
    Continuation,
    /// Close, Ping or Pong.
    Control,
}

/// Whether a client frame with this `rsv1` starts a compressed message; a
/// protocol error (close 1002) when RSV1 is set where it means nothing: on a
/// control or continuation frame, or when the extension was not negotiated.
pub fn rsv1_compressed(rsv1: bool, kind: FrameKind, negotiated: bool) -> Result<bool, RsvError> {
    match (rsv1, kind) {
        (false, _) => Ok(false),
        (true, FrameKind::First) if negotiated => Ok(true),
        (true, FrameKind::First) => Err(RsvError::NotNegotiated),
        (true, FrameKind::Continuation) => Err(RsvError::Continuation),
        (true, FrameKind::Control) => Err(RsvError::Control),
    }
}

/// RSV1 where it is not allowed: close 1002.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RsvError {
    /// RSV1 without a negotiated permessage-deflate.
    #[error("RSV1 set but permessage-deflate was not negotiated")]
    NotNegotiated,
    /// RSV1 on a control frame.
    #[error("RSV1 set on a control frame")]
    Control,
    /// RSV1 on a continuation frame (only a message's first frame has it).
    #[error("RSV1 set on a continuation frame")]
    Continuation,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn answer(offers: &[&str]) -> Option<&'static str> {
        Compression::default()
            .negotiate(offers.iter().map(|s| s.as_bytes()))
            .map(|a| a.header_value())
    }

    #[test]
    fn browser_and_python_offers_are_accepted() {
        // Chromium, Firefox and Python websockets.
        assert_eq!(
            answer(&["permessage-deflate; client_max_window_bits"]),
            Some(ANSWER)
        );
        assert_eq!(answer(&["permessage-deflate"]), Some(ANSWER));
        assert_eq!(
            answer(&["Permessage-Deflate; Server_No_Context_Takeover; client_no_context_takeover"]),
            Some(ANSWER)
        );
        assert_eq!(
            answer(&["permessage-deflate; client_max_window_bits=\"10\""]),
            Some(ANSWER)
        );
    }

    #[test]
    fn server_window_below_ours_is_refused_and_ours_is_echoed() {
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=10"]),
            None
        );
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=15"]),
            Some(ANSWER_WINDOW)
        );
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits"]),
            None
        );
    }

    #[test]
    fn the_first_acceptable_offer_wins() {
        let offers = [
            "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=9",
            "permessage-deflate; server_max_window_bits=15, permessage-deflate",
        ];
        assert_eq!(answer(&offers), Some(ANSWER_WINDOW));
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=8, permessage-deflate; client_max_window_bits"]),
            Some(ANSWER)
        );
    }

    #[test]
    fn malformed_or_unknown_parameters_refuse_the_offer() {
        for offer in [
            "permessage-deflate; foo",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=015",
            "permessage-deflate; client_max_window_bits=abc",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_max_window_bits; client_max_window_bits",
            "permessage-deflate; client_max_window_bits=\"1,5\"",
            "permessage-deflate; server_max_window_bits=\"15",
            "x-webkit-deflate-frame",
            "",
        ] {
            assert_eq!(answer(&[offer]), None, "{offer}");
        }
        // Not UTF-8: ignored, not a panic.
        assert_eq!(
            Compression::default().negotiate([&b"permessage-deflate\xff"[..]]),
            None
        );
    }

    #[test]
    fn compression_off_ignores_the_offer() {
        let off = Compression {
            enabled: false,
            min_bytes: 0,
        };
        assert_eq!(off.negotiate([&b"permessage-deflate"[..]]), None);
        assert!(!off.worth_compressing(10_000));
        let on = Compression::default();
        assert!(!on.worth_compressing(255));
        assert!(on.worth_compressing(256));
    }

    fn flags(args: &[&str]) -> Result<Compression, clap::Error> {
        use clap::Parser;
        let cli = crate::config::Cli::try_parse_from(args.iter().copied())?;
        Ok(cli.serve.compression.settings())
    }

    #[test]
    fn flags_default_on_256_and_parse() {
        assert_eq!(flags(&["wsgate"]).unwrap(), Compression::default());
        assert_eq!(
            flags(&[
                "wsgate",
                "--compression",
                "off",
                "--compression-min-bytes",
                "1"
            ])
            .unwrap(),
            Compression {
                enabled: false,
                min_bytes: 1
            }
        );
        let err = flags(&["wsgate", "--compression", "maybe"]).unwrap_err();
        assert!(
            err.to_string().contains("possible values: on, off"),
            "{err}"
        );
        assert!(flags(&["wsgate", "--compression-min-bytes", "-1"]).is_err());
    }

    fn json_payload(n: usize) -> Vec<u8> {
        let mut s = String::from("{\"type\":\"message\",\"room\":\"dashboard\",\"data\":[");
        let mut i = 0;
        while s.len() < n {
            s.push_str(&format!(
                "{{\"cpu\":{},\"mem\":{},\"host\":\"node-{}\"}},",
                i % 97,
                i * 31 % 1000,
                i % 7
            ));
            i += 1;
        }
        s.push_str("{}]}");
        s.into_bytes()
    }

    #[test]
    fn a_message_round_trips_without_the_tail_and_independently() {
        let payload = json_payload(2048);
        let once = compress(&payload);
        assert!(!once.ends_with(&TAIL));
        assert!(
            once.len() * 3 < payload.len(),
            "{} -> {}",
            payload.len(),
            once.len()
        );
        // No context takeover: compressing again gives the same bytes.
        assert_eq!(compress(&payload), once);
        assert_eq!(inflate(&once, payload.len()).unwrap(), payload);
        // A second message decodes on its own, too.
        let other = compress(b"hello hello hello");
        assert_eq!(inflate(&other, 100).unwrap(), b"hello hello hello");
        assert_eq!(inflate(&compress(b""), 0).unwrap(), b"");
    }

    #[test]
    fn large_and_incompressible_messages_round_trip() {
        let big = json_payload(3 << 20);
        assert_eq!(inflate(&compress(&big), big.len()).unwrap(), big);
        let mut noise = vec![0u8; 200_000];
        let mut x: u32 = 1;
        for b in &mut noise {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            *b = (x >> 16) as u8;
        }
        let packed = compress(&noise);
        assert!(packed.len() < noise.len() + 100);
        assert_eq!(inflate(&packed, noise.len()).unwrap(), noise);
    }

    #[test]
    fn the_limit_applies_to_the_inflated_size() {
        let payload = json_payload(10_000);
        let packed = compress(&payload);
        assert_eq!(
            inflate(&packed, payload.len()).unwrap().len(),
            payload.len()
        );
        assert_eq!(
            inflate(&packed, payload.len() - 1),
            Err(InflateError::TooBig)
        );
    }

    #[test]
    fn a_deflate_bomb_stops_at_the_limit() {
        // 1 KiB on the wire, 8 MiB of zeros inflated (deflate reaches ~1000:1).
        let zeros = vec![0u8; 8 << 20];
        let bomb = compress(&zeros);
        assert!(bomb.len() <= 10 * 1024, "{}", bomb.len());
        let limit = 64 * 1024;
        assert_eq!(inflate(&bomb, limit), Err(InflateError::TooBig));
        assert_eq!(InflateError::TooBig.close_code(), 1009);
        // The inflater is usable again afterwards.
        assert_eq!(inflate(&compress(b"after"), limit).unwrap(), b"after");
    }

    #[test]
    fn the_output_never_grows_past_the_limit() {
        let bomb = compress(&vec![b'a'; 4 << 20]);
        INFLATER.with(|d| {
            let mut d = d.borrow_mut();
            d.reset(false);
            // inflate_with returns as soon as the buffer would pass the
            // limit; the largest buffer it may hold is limit + 1 + one step.
            let limit = 100_000;
            assert_eq!(
                inflate_with(&mut d, &bomb, limit),
                Err(InflateError::TooBig)
            );
            assert!(d.total_out() <= (limit + 1) as u64, "{}", d.total_out());
        });
    }

    #[test]
    fn corrupt_data_is_an_error_not_a_panic() {
        // Block type 3 is reserved.
        assert_eq!(
            inflate(&[0xff, 0xff, 0xff], 1000),
            Err(InflateError::Corrupt)
        );
        assert_eq!(InflateError::Corrupt.close_code(), 1007);
        // Bit-flipped real data, every position: an error or some bytes within
        // the limit, never a panic or more than the limit.
        let good = compress(&json_payload(1000));
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x5a;
            if let Ok(out) = inflate(&bad, 2000) {
                assert!(out.len() <= 2000);
            }
        }
    }

    #[test]
    fn rsv1_is_only_meaningful_on_a_negotiated_first_frame() {
        assert_eq!(rsv1_compressed(true, FrameKind::First, true), Ok(true));
        assert_eq!(rsv1_compressed(false, FrameKind::First, true), Ok(false));
        assert_eq!(rsv1_compressed(false, FrameKind::Control, true), Ok(false));
        assert_eq!(
            rsv1_compressed(true, FrameKind::First, false),
            Err(RsvError::NotNegotiated)
        );
        assert_eq!(
            rsv1_compressed(true, FrameKind::Control, true),
            Err(RsvError::Control)
        );
        assert_eq!(
            rsv1_compressed(true, FrameKind::Continuation, true),
            Err(RsvError::Continuation)
        );
    }
}
