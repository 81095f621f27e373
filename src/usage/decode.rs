//! Push-style decoding of a `Content-Encoding`d body into a writer, one
//! chunk at a time, with each decoder's fixed window as the only state.
//! A body that fails to decode stops being decoded; what was read stays.

use std::io::Write;

/// Largest zstd window accepted (8 MiB): providers use far smaller ones, and
/// an unbounded window would let one answer claim gigabytes.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

#[derive(Default)]
enum Codec<W: Write> {
    /// Nothing to decode or read.
    #[default]
    Off,
    Identity(W),
    /// `deflate` is zlib-wrapped by the standard, raw by some servers: the
    /// first byte tells.
    DeflateUndecided(W),
    Zlib(flate2::write::ZlibDecoder<W>),
    RawDeflate(flate2::write::DeflateDecoder<W>),
    Gzip(flate2::write::MultiGzDecoder<W>),
    Brotli(Box<brotli_decompressor::DecompressorWriter<W>>),
    Zstd(zstd::stream::write::Decoder<'static, W>),
}

/// A body decoder feeding a writer.
pub struct Decoding<W: Write> {
    codec: Codec<W>,
    /// Set on a decode error or at the end; nothing more is decoded.
    stopped: bool,
}

impl<W: Write> Default for Decoding<W> {
    fn default() -> Self {
        Decoding {
            codec: Codec::Off,
            stopped: true,
        }
    }
}

impl<W: Write> Decoding<W> {
    /// A decoder for `encoding` (a single coding; `identity` or none means
    /// plain bytes). An unsupported coding is not read at all.
    pub fn new(encoding: Option<&str>, sink: W) -> Self {
        let encoding = encoding.map(|e| e.trim().to_ascii_lowercase()).unwrap_or_default();
        let codec = match encoding.as_str() {
            "" | "identity" => Codec::Identity(sink),
            "gzip" | "x-gzip" => Codec::Gzip(flate2::write::MultiGzDecoder::new(sink)),
            "deflate" => Codec::DeflateUndecided(sink),
            "br" => Codec::Brotli(Box::new(brotli_decompressor::DecompressorWriter::new(sink, 4096))),
            "zstd" => match zstd::stream::write::Decoder::new(sink) {
                Ok(mut d) => match d.window_log_max(ZSTD_WINDOW_LOG_MAX) {
                    Ok(()) => Codec::Zstd(d),
                    Err(_) => Codec::Off,
                },
                Err(_) => Codec::Off,
            },
            other => {
                tracing::debug!(encoding = other, "Unsupported content-encoding; usage is not read.");
                Codec::Off
            }
        };
        Decoding { codec, stopped: false }
    }

    /// Decode `chunk` into the writer.
    pub fn write(&mut self, chunk: &[u8]) {
        if chunk.is_empty() || self.stopped {
            return;
        }
        if let Codec::DeflateUndecided(_) = self.codec
            && let Codec::DeflateUndecided(sink) = std::mem::take(&mut self.codec)
        {
            // A zlib header has compression method 8 in its low nibble.
            self.codec = if chunk[0] & 0x0f == 8 {
                Codec::Zlib(flate2::write::ZlibDecoder::new(sink))
            } else {
                Codec::RawDeflate(flate2::write::DeflateDecoder::new(sink))
            };
        }
        let result = match &mut self.codec {
            Codec::Off | Codec::DeflateUndecided(_) => Ok(()),
            Codec::Identity(w) => w.write_all(chunk),
            Codec::Zlib(d) => d.write_all(chunk),
            Codec::RawDeflate(d) => d.write_all(chunk),
            Codec::Gzip(d) => d.write_all(chunk),
            Codec::Brotli(d) => d.write_all(chunk),
            Codec::Zstd(d) => d.write_all(chunk),
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "The response body could not be decoded further; usage reading stops.");
            self.stopped = true;
        }
    }

    /// Push what the decoder still holds into the writer; no more input.
    pub fn finish(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let _ = match &mut self.codec {
            Codec::Zlib(d) => d.try_finish(),
            Codec::RawDeflate(d) => d.try_finish(),
            Codec::Gzip(d) => d.try_finish(),
            Codec::Brotli(d) => d.flush(),
            Codec::Zstd(d) => d.flush(),
            _ => Ok(()),
        };
    }

    pub fn sink(&self) -> Option<&W> {
        match &self.codec {
            Codec::Identity(w) | Codec::DeflateUndecided(w) => Some(w),
            Codec::Zlib(d) => Some(d.get_ref()),
            Codec::RawDeflate(d) => Some(d.get_ref()),
            Codec::Gzip(d) => Some(d.get_ref()),
            Codec::Brotli(d) => Some(d.get_ref()),
            Codec::Zstd(d) => Some(d.get_ref()),
            Codec::Off => None,
        }
    }

    pub fn sink_mut(&mut self) -> Option<&mut W> {
        match &mut self.codec {
            Codec::Identity(w) | Codec::DeflateUndecided(w) => Some(w),
            Codec::Zlib(d) => Some(d.get_mut()),
            Codec::RawDeflate(d) => Some(d.get_mut()),
            Codec::Gzip(d) => Some(d.get_mut()),
            Codec::Brotli(d) => Some(d.get_mut()),
            Codec::Zstd(d) => Some(d.get_mut()),
            Codec::Off => None,
        }
    }
}
