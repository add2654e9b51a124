//! Payload builders shared by the integration tests (each test file is its
//! own crate, so they include this module with `mod common;`).

use rmp::encode as enc;

/// A map-form batch stamped `ts` with one `BlockStored` of block `h` (tokens
/// `[token, token]`, block size 2) chained from `parent`.
pub fn stored(ts: f64, h: u64, parent: Option<u64>, token: u64) -> Vec<u8> {
    let mut b = Vec::new();
    enc::write_array_len(&mut b, 3).unwrap();
    enc::write_f64(&mut b, ts).unwrap();
    enc::write_array_len(&mut b, 1).unwrap();
    enc::write_map_len(&mut b, 5).unwrap();
    enc::write_str(&mut b, "type").unwrap();
    enc::write_str(&mut b, "BlockStored").unwrap();
    enc::write_str(&mut b, "block_hashes").unwrap();
    enc::write_array_len(&mut b, 1).unwrap();
    enc::write_uint(&mut b, h).unwrap();
    enc::write_str(&mut b, "parent_block_hash").unwrap();
    match parent {
        Some(p) => {
            enc::write_uint(&mut b, p).unwrap();
        }
        None => enc::write_nil(&mut b).unwrap(),
    }
    enc::write_str(&mut b, "token_ids").unwrap();
    enc::write_array_len(&mut b, 2).unwrap();
    enc::write_uint(&mut b, token).unwrap();
    enc::write_uint(&mut b, token).unwrap();
    enc::write_str(&mut b, "block_size").unwrap();
    enc::write_uint(&mut b, 2).unwrap();
    enc::write_nil(&mut b).unwrap();
    b
}
