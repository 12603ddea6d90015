//! Turning a complete raw deflate stream (RFC 1951) into a piece of a longer one.
//!
//! libdeflate deflates a buffer whole: its output ends with a block marked final. To chain such
//! outputs into one stream (one gzip member), every piece but the last must lose that mark and
//! end on a byte boundary. [`unfinalize`] walks the stream's blocks (decoding their Huffman
//! codes only far enough to find where each block ends), clears the final block's BFINAL bit,
//! cuts the stream at the end of that block and appends an empty stored block, the marker a
//! zlib sync flush writes, which realigns to a byte.

use anyhow::{Result, bail, ensure};

/// Reads bits least significant first, as deflate packs them, through a 64-bit buffer
/// refilled eight bytes at a time.
struct Bits<'a> {
    data: &'a [u8],
    /// The next byte to load into `buf`.
    next: usize,
    buf: u64,
    /// Valid bits in `buf`.
    count: u32,
    /// Refilled past the end of the data by more than a refill's worth: the stream is cut.
    overrun: bool,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8]) -> Self {
        Bits {
            data,
            next: 0,
            buf: 0,
            count: 0,
            overrun: false,
        }
    }

    /// Position in bits.
    fn pos(&self) -> usize {
        self.next * 8 - self.count as usize
    }

    /// Makes at least 56 bits available (zeros past the end of the data).
    #[inline]
    fn refill(&mut self) {
        if self.count >= 56 {
            return;
        }
        if let Some(bytes) = self.data.get(self.next..self.next + 8) {
            let word = u64::from_le_bytes(bytes.try_into().unwrap_or([0; 8]));
            self.buf |= word << self.count;
            let taken = (63 - self.count) / 8;
            self.next += taken as usize;
            self.count += taken * 8;
        } else {
            while self.count <= 56 {
                let b = self.data.get(self.next).copied().unwrap_or(0);
                self.buf |= u64::from(b) << self.count;
                self.next += 1;
                self.count += 8;
            }
            self.overrun |= self.next > self.data.len() + 8;
        }
    }

    #[inline]
    fn peek(&mut self) -> u32 {
        self.refill();
        self.buf as u32
    }

    /// Drops `n` bits already in the buffer (after a refill: at most 56).
    #[inline]
    fn consume(&mut self, n: u32) {
        self.buf >>= n;
        self.count -= n;
    }

    #[inline]
    fn skip(&mut self, n: u32) -> Result<()> {
        self.refill();
        self.buf >>= n;
        self.count -= n;
        ensure!(
            self.pos() <= self.data.len() * 8,
            "the deflate stream ends inside a block"
        );
        Ok(())
    }

    fn take(&mut self, n: u32) -> Result<u32> {
        ensure!(n <= 24, "reading {n} bits at once");
        let v = self.peek() & ((1u32 << n) - 1);
        self.skip(n)?;
        Ok(v)
    }

    /// Skips to the next byte boundary.
    fn align(&mut self) -> Result<()> {
        let pad = (8 - self.pos() % 8) % 8;
        self.skip(pad as u32)
    }

    /// Skips `n` whole bytes (at a byte boundary).
    fn skip_bytes(&mut self, n: usize) -> Result<()> {
        let to = self.pos() + n * 8;
        ensure!(
            to <= self.data.len() * 8,
            "the deflate stream ends inside a block"
        );
        self.next = to / 8;
        self.buf = 0;
        self.count = 0;
        Ok(())
    }
}

/// Codes up to this long decode with one lookup; longer ones (rare) bit by bit.
const PRIMARY_BITS: u32 = 10;

/// A canonical Huffman code: a lookup table indexed by the next [`PRIMARY_BITS`] bits
/// (bit-reversed code order, as the bits arrive), each entry (symbol, code length): length 0
/// for a pattern no code starts with, [`LONG`] where only a longer code does; and the counts
/// and sorted symbols that decode a longer code canonically.
struct Huffman {
    table: Vec<(u16, u8)>,
    counts: [u16; 16],
    symbols: Vec<u16>,
}

/// The table entry of a pattern that starts only codes longer than [`PRIMARY_BITS`].
const LONG: u8 = 0xff;

impl Huffman {
    fn new(lengths: &[u8]) -> Result<Huffman> {
        ensure!(
            lengths.iter().all(|&l| l <= 15),
            "a Huffman code longer than 15 bits"
        );
        let mut counts = [0u16; 16];
        for &l in lengths {
            counts[l as usize] += 1;
        }
        counts[0] = 0;
        let mut next = [0u32; 16];
        let mut code = 0u32;
        for bits in 1..16 {
            code = (code + u32::from(counts[bits - 1])) << 1;
            next[bits] = code;
        }
        let mut offsets = [0usize; 16];
        for bits in 1..15 {
            offsets[bits + 1] = offsets[bits] + counts[bits] as usize;
        }
        let mut symbols = vec![0u16; lengths.iter().filter(|&&l| l != 0).count()];
        let mut table = vec![(0u16, 0u8); 1 << PRIMARY_BITS];
        for (sym, &len) in lengths.iter().enumerate() {
            if len == 0 {
                continue;
            }
            symbols[offsets[len as usize]] = sym as u16;
            offsets[len as usize] += 1;
            let len = u32::from(len);
            let c = next[len as usize];
            next[len as usize] += 1;
            ensure!(c < (1 << len), "an over-subscribed Huffman code");
            let rev = c.reverse_bits() >> (32 - len);
            if len <= PRIMARY_BITS {
                let mut i = rev as usize;
                while i < table.len() {
                    table[i] = (sym as u16, len as u8);
                    i += 1 << len;
                }
            } else {
                table[(rev & ((1 << PRIMARY_BITS) - 1)) as usize] = (0, LONG);
            }
        }
        Ok(Huffman {
            table,
            counts,
            symbols,
        })
    }

    /// Decodes one symbol from the (refilled) buffer `buf`: (symbol, code length); length 0
    /// when no code matches.
    #[inline(always)]
    fn lookup(&self, buf: u64) -> (u16, u32) {
        let (sym, len) = self.table[(buf & ((1 << PRIMARY_BITS) - 1)) as usize];
        if len != LONG {
            return (sym, u32::from(len));
        }
        self.lookup_long(buf)
    }

    /// Canonical decoding, one bit at a time (codes are read most significant bit first).
    #[cold]
    #[inline(never)]
    fn lookup_long(&self, buf: u64) -> (u16, u32) {
        let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
        for len in 1..16u32 {
            code |= ((buf >> (len - 1)) & 1) as i32;
            let count = i32::from(self.counts[len as usize]);
            if code - first < count {
                return (self.symbols[(index + code - first) as usize], len);
            }
            index += count;
            first = (first + count) << 1;
            code <<= 1;
        }
        (0, 0)
    }

    #[inline]
    fn decode(&self, bits: &mut Bits<'_>) -> Result<u16> {
        bits.refill();
        let (sym, len) = self.lookup(bits.buf);
        if len == 0 {
            bail!("a bit pattern no Huffman code has");
        }
        bits.skip(len)?;
        Ok(sym)
    }
}

/// Extra bits of the length symbols 257..=285.
const LENGTH_EXTRA: [u32; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
/// Extra bits of the distance symbols 0..=29.
const DISTANCE_EXTRA: [u32; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];
/// The order in which a dynamic block lists the code length code's lengths.
const CODE_LENGTH_ORDER: [usize; 19] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];

/// A block's two codes: canonical decoders for every code, and [`FAST_BITS`]-bit tables that
/// take the common case (codes that short) in one lookup per symbol, two per literal pair.
struct Codes {
    litlen: Huffman,
    dist: Huffman,
    /// Per pattern: bits to drop (with a length symbol's extra bits) and what was there.
    fast_litlen: Vec<u32>,
    /// Per pattern: bits to drop (code and extra bits), or [`SLOW`].
    fast_dist: Vec<u32>,
}

/// Bits the fast tables look at.
const FAST_BITS: u32 = 11;
const FAST_MASK: u64 = (1 << FAST_BITS) - 1;
/// Fast entries: the bits to drop in the low byte, the kind above.
const K_LITERALS: u32 = 0 << 8;
const K_LENGTH: u32 = 1 << 8;
const K_END: u32 = 2 << 8;
/// A longer code or no code: decoded the slow way.
const SLOW: u32 = 3 << 8;
const KIND: u32 = 3 << 8;

impl Codes {
    fn new(litlen: &[u8], dist: &[u8]) -> Result<Codes> {
        // (symbol, length) of the code each FAST_BITS pattern starts with, 0 if longer or none.
        let (litlen, dist) = (Huffman::new(litlen)?, Huffman::new(dist)?);
        let short = |h: &Huffman| -> Vec<(u16, u32)> {
            (0..1u64 << FAST_BITS)
                .map(|i| match h.lookup(i) {
                    (s, l) if l != 0 && l <= FAST_BITS => (s, l),
                    _ => (0, 0),
                })
                .collect()
        };
        let (lit, dis) = (short(&litlen), short(&dist));
        let fast_litlen = (0..lit.len())
            .map(|i| match lit[i] {
                (_, 0) => SLOW,
                (s, l) if s < 256 => {
                    // A second literal when the rest of the pattern decides it.
                    match lit[i >> l] {
                        (s2, l2) if l2 != 0 && l2 <= FAST_BITS - l && s2 < 256 => {
                            K_LITERALS | (l + l2)
                        }
                        _ => K_LITERALS | l,
                    }
                }
                (256, l) => K_END | l,
                (s @ 257..=285, l) => K_LENGTH | (l + LENGTH_EXTRA[(s - 257) as usize]),
                _ => SLOW,
            })
            .collect();
        let fast_dist = dis
            .iter()
            .map(|&(d, l)| {
                if l != 0 && d < 30 {
                    l + DISTANCE_EXTRA[d as usize]
                } else {
                    SLOW
                }
            })
            .collect();
        Ok(Codes {
            litlen,
            dist,
            fast_litlen,
            fast_dist,
        })
    }
}

/// Skips the symbols of one Huffman-coded block, up to and including its end-of-block code.
fn skip_symbols(bits: &mut Bits<'_>, codes: &Codes) -> Result<()> {
    loop {
        bits.refill();
        ensure!(!bits.overrun, "the deflate stream ends inside a block");
        // At least 56 bits now: a length code with its extra bits (20) and a distance code
        // with its extra bits (28) both fit.
        let e = codes.fast_litlen[(bits.buf & FAST_MASK) as usize];
        match e & KIND {
            K_LITERALS => {
                bits.consume(e & 0xff);
                // More literals while the buffer surely holds the bits a fast entry looks at.
                while bits.count >= FAST_BITS {
                    let e = codes.fast_litlen[(bits.buf & FAST_MASK) as usize];
                    if e & KIND != K_LITERALS {
                        break;
                    }
                    bits.consume(e & 0xff);
                }
            }
            K_LENGTH => {
                bits.consume(e & 0xff);
                skip_distance(bits, codes)?;
            }
            K_END => {
                bits.consume(e & 0xff);
                return end_of_block(bits);
            }
            _ => {
                // A code longer than FAST_BITS, or none.
                let (sym, len) = codes.litlen.lookup(bits.buf);
                ensure!(len != 0, "a bit pattern no Huffman code has");
                bits.consume(len);
                match sym {
                    0..=255 => {}
                    256 => return end_of_block(bits),
                    257..=285 => {
                        bits.consume(LENGTH_EXTRA[(sym - 257) as usize]);
                        skip_distance(bits, codes)?;
                    }
                    _ => bail!("length symbol {sym}"),
                }
            }
        }
    }
}

/// Skips a distance code and its extra bits (at most 28 bits, in the buffer).
#[inline(always)]
fn skip_distance(bits: &mut Bits<'_>, codes: &Codes) -> Result<()> {
    let e = codes.fast_dist[(bits.buf & FAST_MASK) as usize];
    if e != SLOW {
        bits.consume(e);
        return Ok(());
    }
    let (d, dlen) = codes.dist.lookup(bits.buf);
    ensure!(dlen != 0 && d < 30, "a bit pattern no distance code has");
    bits.consume(dlen);
    bits.consume(DISTANCE_EXTRA[d as usize]);
    Ok(())
}

fn end_of_block(bits: &Bits<'_>) -> Result<()> {
    ensure!(
        bits.pos() <= bits.data.len() * 8,
        "the deflate stream ends inside a block"
    );
    Ok(())
}

/// The fixed codes of BTYPE 01.
fn fixed() -> Result<Codes> {
    let mut l = [8u8; 288];
    l[144..256].fill(9);
    l[256..280].fill(7);
    Codes::new(&l, &[5u8; 30])
}

/// Reads a dynamic block's code definitions (BTYPE 10).
fn dynamic(bits: &mut Bits<'_>) -> Result<Codes> {
    let hlit = bits.take(5)? as usize + 257;
    let hdist = bits.take(5)? as usize + 1;
    let hclen = bits.take(4)? as usize + 4;
    let mut cl = [0u8; 19];
    for &i in &CODE_LENGTH_ORDER[..hclen] {
        cl[i] = bits.take(3)? as u8;
    }
    let cl = Huffman::new(&cl)?;
    let mut lengths = Vec::with_capacity(hlit + hdist);
    while lengths.len() < hlit + hdist {
        let sym = cl.decode(bits)?;
        let (value, times) = match sym {
            0..=15 => (sym as u8, 1),
            16 => {
                let prev = *lengths
                    .last()
                    .ok_or_else(|| anyhow::anyhow!("a repeated code length with none before it"))?;
                (prev, 3 + bits.take(2)? as usize)
            }
            17 => (0, 3 + bits.take(3)? as usize),
            18 => (0, 11 + bits.take(7)? as usize),
            _ => bail!("code length symbol {sym}"),
        };
        ensure!(
            lengths.len() + times <= hlit + hdist,
            "code lengths run past the codes"
        );
        lengths.extend(std::iter::repeat_n(value, times));
    }
    ensure!(lengths[256] != 0, "no end-of-block code");
    Codes::new(&lengths[..hlit], &lengths[hlit..])
}

/// Makes the complete raw deflate stream `stream` a non-final piece of a longer stream: the
/// final block's BFINAL bit cleared, the stream cut where that block ends, an empty stored
/// block appended (byte-aligned, as after a zlib sync flush). Fails, changing nothing, on a
/// stream that does not parse.
pub fn unfinalize(stream: &mut Vec<u8>) -> Result<()> {
    let mut bits = Bits::new(stream);
    let final_at = loop {
        let at = bits.pos();
        let last = bits.take(1)? == 1;
        match bits.take(2)? {
            0 => {
                bits.align()?;
                let len = bits.take(16)?;
                let nlen = bits.take(16)?;
                ensure!(len == !nlen & 0xffff, "a stored block's length check fails");
                bits.skip_bytes(len as usize)?;
            }
            1 => skip_symbols(&mut bits, &fixed()?)?,
            2 => {
                let codes = dynamic(&mut bits)?;
                skip_symbols(&mut bits, &codes)?;
            }
            _ => bail!("a block of the reserved type 3"),
        }
        if last {
            break at;
        }
    };
    let end = bits.pos();
    ensure!(
        end.div_ceil(8) == stream.len(),
        "data after the final deflate block"
    );
    stream[final_at / 8] &= !(1u8 << (final_at % 8));
    // An empty stored block: BFINAL 0, BTYPE 00, then zeros to the byte boundary, LEN 0, NLEN
    // 0xffff. The bits after `end` in its last byte are padding (zero), so the 3 header bits
    // and the alignment are already there when they fit; else one more zero byte holds them.
    stream.truncate(end.div_ceil(8));
    let used = end % 8;
    if let (true, Some(b)) = (used != 0, stream.last_mut()) {
        // Whatever padding the encoder left after the end-of-block code becomes the header.
        *b &= (1u8 << used) - 1;
    }
    if used == 0 || used > 5 {
        stream.push(0);
    }
    stream.extend_from_slice(&[0x00, 0x00, 0xff, 0xff]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress, Status};

    fn libdeflate(data: &[u8], level: i32) -> Vec<u8> {
        let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::new(level).unwrap());
        let mut out = vec![0u8; c.deflate_compress_bound(data.len())];
        let n = c.deflate_compress(data, &mut out).unwrap();
        out.truncate(n);
        out
    }

    fn inflate_whole(stream: &[u8], expect: usize) -> Vec<u8> {
        let mut d = Decompress::new(false);
        let mut out = Vec::with_capacity(expect + 16);
        let status = d
            .decompress_vec(stream, &mut out, FlushDecompress::Finish)
            .unwrap();
        assert_eq!(status, Status::StreamEnd);
        assert_eq!(d.total_in() as usize, stream.len(), "input left over");
        out
    }

    fn inputs() -> Vec<Vec<u8>> {
        let mut x: u32 = 7;
        let mut noise = |n: usize| crate::pack::test_noise(&mut x, n);
        vec![
            Vec::new(),
            b"a".to_vec(),
            b"hello hello hello hello".to_vec(),
            vec![0u8; 1 << 20],
            noise(70_000),
            b"root:x:0:0:root:/root:/bin/bash\n".repeat(30_000),
            [noise(200_000), vec![0; 300_000], b"abc".repeat(100_000)].concat(),
        ]
    }

    #[test]
    fn pieces_chain_into_one_stream_at_every_level() {
        for level in [0, 1, 4, 6, 9, 12] {
            let parts = inputs();
            let mut stream = Vec::new();
            for (i, p) in parts.iter().enumerate() {
                let mut piece = libdeflate(p, level);
                if i + 1 < parts.len() {
                    unfinalize(&mut piece).unwrap();
                    assert_eq!(&piece[piece.len() - 4..], &[0, 0, 0xff, 0xff]);
                }
                stream.extend_from_slice(&piece);
            }
            let whole: Vec<u8> = parts.concat();
            assert!(
                inflate_whole(&stream, whole.len()) == whole,
                "level {level}"
            );
        }
    }

    #[test]
    fn codes_longer_than_the_table_decode_too() {
        // Lengths 1, 2, ..., 15, 15: a complete code whose longest codes miss the table.
        let mut lengths: Vec<u8> = (1..=15).collect();
        lengths.push(15);
        let h = Huffman::new(&lengths).unwrap();
        let mut code = 0u32;
        let mut prev = 0;
        for (sym, &len) in lengths.iter().enumerate() {
            if sym > 0 {
                code = (code + 1) << (len - prev);
            }
            prev = len;
            // Sent most significant bit first: the buffer holds it reversed.
            let buf = u64::from(code.reverse_bits() >> (32 - u32::from(len)));
            assert_eq!(h.lookup(buf), (sym as u16, u32::from(len)), "symbol {sym}");
        }
    }

    #[test]
    fn cut_or_random_streams_end_in_an_error_or_a_stream_never_a_hang() {
        let good = libdeflate(&b"root:x:0:0:root:/root:/bin/bash\n".repeat(3000), 6);
        for n in 0..good.len() {
            let mut s = good[..n].to_vec();
            assert!(unfinalize(&mut s).is_err(), "cut at {n}");
        }
        let mut x: u32 = 99;
        for len in [1usize, 2, 5, 17, 100, 1000, 5000] {
            for _ in 0..200 {
                let mut s = crate::pack::test_noise(&mut x, len);
                let before = s.clone();
                if unfinalize(&mut s).is_err() {
                    assert_eq!(s, before);
                }
            }
        }
    }

    #[test]
    fn a_stream_that_does_not_parse_is_refused_unchanged() {
        let good = libdeflate(b"some data some data", 6);
        for bad in [
            Vec::new(),
            good[..good.len() - 1].to_vec(),
            [good.clone(), vec![0]].concat(),
            vec![0x07],
            vec![0x00, 0x01, 0x00, 0x00, 0x00],
        ] {
            let mut s = bad.clone();
            assert!(unfinalize(&mut s).is_err(), "{bad:?}");
            assert_eq!(s, bad);
        }
    }
}
