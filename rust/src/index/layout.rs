//! Packing a semantic ID (one code per level) into a single `u64` key.
//!
//! Level 0 takes the most significant bits and every level takes `ceil(log2(level_size))` bits,
//! so packed keys sort exactly like the SIDs sort lexicographically. That is what makes the
//! index work: "all SIDs that start with this prefix" is one contiguous range of sorted keys.

use crate::error::{Gr2Error, Result};

/// The largest level size a `u16` code can address.
pub const MAX_LEVEL_SIZE: u32 = 1 << 16;
/// The most levels a SID may have, the disambiguation level included. `build` and `load` both
/// enforce it (through [`KeyLayout::new`]), so every index that builds can be saved and read back.
pub const MAX_LEVELS: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyLayout {
    sizes: Vec<u32>,
    bits: Vec<u32>,
    shifts: Vec<u32>,
    total_bits: u32,
}

/// Bits needed to hold codes `0..size` (a level of size 1 needs none: its only code is 0).
fn bits_for(size: u32) -> u32 {
    if size <= 1 {
        0
    } else {
        32 - (size - 1).leading_zeros()
    }
}

fn low_mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

impl KeyLayout {
    /// A layout for SIDs whose level `l` holds codes `0..sizes[l]`.
    pub fn new(sizes: &[u32]) -> Result<Self> {
        if sizes.is_empty() {
            return Err(Gr2Error::invalid("a SID needs at least one level (got 0 levels)"));
        }
        if sizes.len() > MAX_LEVELS {
            return Err(Gr2Error::invalid(format!(
                "SIDs of {} levels are not supported: an index holds at most {MAX_LEVELS} levels",
                sizes.len()
            )));
        }
        if let Some((level, &size)) =
            sizes.iter().enumerate().find(|(_, &s)| s == 0 || s > MAX_LEVEL_SIZE)
        {
            return Err(Gr2Error::invalid(format!(
                "level {level} has size {size}; level sizes must be in 1..={MAX_LEVEL_SIZE} (codes are uint16)"
            )));
        }
        let bits: Vec<u32> = sizes.iter().map(|&s| bits_for(s)).collect();
        let total_bits: u32 = bits.iter().sum();
        if total_bits > 64 {
            return Err(Gr2Error::invalid(format!(
                "SIDs with level sizes {sizes:?} need {total_bits} bits, but the index packs a SID \
                 into 64 bits; use fewer levels or smaller codebooks"
            )));
        }
        let mut shifts = vec![0u32; sizes.len()];
        let mut below = 0;
        for level in (0..sizes.len()).rev() {
            shifts[level] = below;
            below += bits[level];
        }
        Ok(KeyLayout { sizes: sizes.to_vec(), bits, shifts, total_bits })
    }

    pub fn levels(&self) -> usize {
        self.sizes.len()
    }

    pub fn sizes(&self) -> &[u32] {
        &self.sizes
    }

    pub fn bits(&self, level: usize) -> u32 {
        self.bits[level]
    }

    pub fn total_bits(&self) -> u32 {
        self.total_bits
    }

    /// Packs one SID. The caller guarantees `codes.len() == levels` and every code is in range.
    #[inline]
    pub fn pack(&self, codes: &[u16]) -> u64 {
        codes
            .iter()
            .zip(&self.shifts)
            .fold(0u64, |key, (&code, &shift)| key | (u64::from(code) << shift))
    }

    /// The code of `level` inside `key`.
    #[inline]
    pub fn code(&self, key: u64, level: usize) -> u16 {
        ((key >> self.shifts[level]) & low_mask(self.bits[level])) as u16
    }

    #[inline]
    pub fn unpack(&self, key: u64, out: &mut [u16]) {
        for (level, slot) in out.iter_mut().enumerate() {
            *slot = self.code(key, level);
        }
    }

    /// The first level whose code is >= that level's size, if any.
    #[inline]
    pub fn first_out_of_range(&self, codes: &[u16]) -> Option<usize> {
        codes.iter().zip(&self.sizes).position(|(&code, &size)| u32::from(code) >= size)
    }

    /// Whether every field of `key` is a valid code (and no bit above the packed width is set).
    pub fn key_is_valid(&self, key: u64) -> bool {
        if self.total_bits < 64 && key >> self.total_bits != 0 {
            return false;
        }
        (0..self.levels()).all(|level| u32::from(self.code(key, level)) < self.sizes[level])
    }

    /// The inclusive key range `[lo, hi]` of all SIDs that start with `prefix`
    /// (`prefix.len() <= levels`, codes in range; the empty prefix covers every key).
    pub fn prefix_bounds(&self, prefix: &[u16]) -> (u64, u64) {
        let lo = prefix
            .iter()
            .zip(&self.shifts)
            .fold(0u64, |key, (&code, &shift)| key | (u64::from(code) << shift));
        let free_bits: u32 = self.bits[prefix.len()..].iter().sum();
        (lo, lo | low_mask(free_bits))
    }

    /// The layout with one more level of `size` codes appended at the end.
    pub fn with_level(&self, size: u32) -> Result<Self> {
        let mut sizes = self.sizes.clone();
        sizes.push(size);
        KeyLayout::new(&sizes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bit_widths() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(256), 8);
        assert_eq!(bits_for(257), 9);
        assert_eq!(bits_for(65536), 16);
        let layout = KeyLayout::new(&[256, 256, 256, 256]).unwrap();
        assert_eq!(layout.total_bits(), 32);
        assert_eq!(layout.pack(&[1, 2, 3, 4]), 0x01020304);
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(KeyLayout::new(&[]).is_err());
        assert!(KeyLayout::new(&[0, 4]).is_err());
        assert!(KeyLayout::new(&[65537]).is_err());
        assert!(KeyLayout::new(&[65536; 5]).is_err());
        assert!(KeyLayout::new(&[65536; 4]).is_ok());
        assert!(KeyLayout::new(&[1; MAX_LEVELS]).is_ok());
        let err = KeyLayout::new(&[1; MAX_LEVELS + 1]).unwrap_err().to_string();
        assert!(err.contains("at most 64 levels"), "{err}");
        assert!(KeyLayout::new(&[1; MAX_LEVELS]).unwrap().with_level(2).is_err());
    }

    fn layout_and_codes() -> impl Strategy<Value = (Vec<u32>, Vec<u16>, Vec<u16>)> {
        proptest::collection::vec(1u32..=3000, 1..5).prop_flat_map(|sizes| {
            let a: Vec<_> = sizes.iter().map(|&s| 0..s as u16).collect();
            let b: Vec<_> = sizes.iter().map(|&s| 0..s as u16).collect();
            (Just(sizes), a, b)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(256)))]

        #[test]
        fn pack_roundtrips_and_preserves_order((sizes, a, b) in layout_and_codes()) {
            let layout = KeyLayout::new(&sizes).unwrap();
            let (ka, kb) = (layout.pack(&a), layout.pack(&b));
            let mut back = vec![0u16; sizes.len()];
            layout.unpack(ka, &mut back);
            prop_assert_eq!(&back, &a);
            prop_assert!(layout.key_is_valid(ka));
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            for len in 0..=sizes.len() {
                let (lo, hi) = layout.prefix_bounds(&a[..len]);
                prop_assert!(lo <= ka && ka <= hi);
                let b_in = lo <= kb && kb <= hi;
                prop_assert_eq!(b_in, a[..len] == b[..len]);
            }
        }
    }
}
