//! SplitMix64: a tiny deterministic generator, for what must repeat exactly from a seed
//! (generated data, shuffles, sampling seeds, bootstrap draws, test fixtures) and must not
//! depend on libtorch's process-wide generator, which other threads may reseed.

/// Advances `state` and returns the next value.
pub fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform draw in [0, 1) with 53 random bits.
pub fn uniform(state: &mut u64) -> f64 {
    (splitmix(state) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_is_splitmix64s() {
        // The reference values of SplitMix64 from seed 0 (Vigna's splitmix64.c).
        let mut state = 0;
        assert_eq!(splitmix(&mut state), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix(&mut state), 0x6E78_9E6A_A1B9_65F4);
        let draws: Vec<f64> = (0..1000).map(|_| uniform(&mut state)).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
    }
}
