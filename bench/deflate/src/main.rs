//! Block deflate as debimg's packer does it (1 MiB blocks, each seeded with the previous 32 KiB
//! as dictionary and ended with a sync flush, so the pieces form one deflate stream), on one
//! core, with flate2's backend (zlib-rs or zlib-ng, chosen at build time); and libdeflate on
//! the same blocks (which can only deflate each block whole: no dictionary, a final block per
//! call, so its pieces do not form one stream). Prints one line per engine and level:
//! `engine level seconds MB/s bytes`.
//!
//! Usage: deflate-compare IMAGE [LEVEL...] (default levels 4 5 6); the best of 3 runs each.

use std::time::Instant;

use flate2::{Compress, Compression, FlushCompress};

const BLOCK: usize = 1 << 20;
const WINDOW: usize = 32 * 1024;
const RUNS: usize = 3;

fn zlib_blocks(data: &[u8], level: u32) -> usize {
    let mut total = 0;
    let mut out = Vec::with_capacity(BLOCK + BLOCK / 8);
    for (i, block) in data.chunks(BLOCK).enumerate() {
        let mut c = Compress::new(Compression::new(level), false);
        if i > 0 {
            let start = i * BLOCK;
            c.set_dictionary(&data[start - WINDOW..start]).unwrap();
        }
        out.clear();
        let last = (i + 1) * BLOCK >= data.len();
        let flush = if last {
            FlushCompress::Finish
        } else {
            FlushCompress::Sync
        };
        loop {
            let done = c.total_in() as usize;
            if out.capacity() - out.len() < 1024 {
                out.reserve(BLOCK / 4);
            }
            c.compress_vec(&block[done..], &mut out, flush).unwrap();
            if c.total_in() as usize == block.len() && out.len() < out.capacity() {
                break;
            }
        }
        total += out.len();
    }
    total
}

fn libdeflate_blocks(data: &[u8], level: i32) -> usize {
    let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::new(level).unwrap());
    let mut out = vec![0u8; c.deflate_compress_bound(BLOCK)];
    data.chunks(BLOCK)
        .map(|b| c.deflate_compress(b, &mut out).unwrap())
        .sum()
}

fn best(f: impl Fn() -> usize) -> (f64, usize) {
    let mut secs = f64::MAX;
    let mut size = 0;
    for _ in 0..RUNS {
        let t = Instant::now();
        size = f();
        secs = secs.min(t.elapsed().as_secs_f64());
    }
    (secs, size)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let image = args
        .get(1)
        .expect("usage: deflate-compare IMAGE [LEVEL...]");
    let data = std::fs::read(image).expect("reading the image");
    let levels: Vec<u32> = if args.len() > 2 {
        args[2..]
            .iter()
            .map(|l| l.parse().expect("a level"))
            .collect()
    } else {
        vec![4, 5, 6]
    };
    let backend = if cfg!(feature = "zlib-ng") {
        "zlib-ng"
    } else {
        "zlib-rs"
    };
    let mb = data.len() as f64 / 1e6;
    for &level in &levels {
        let (s, n) = best(|| zlib_blocks(&data, level));
        println!("{backend} {level} {s:.3} {:.1} {n}", mb / s);
    }
    if !cfg!(feature = "zlib-ng") {
        for &level in &levels {
            let (s, n) = best(|| libdeflate_blocks(&data, level as i32));
            println!("libdeflate {level} {s:.3} {:.1} {n}", mb / s);
        }
    }
}
