//! Comparing training arms (credit schemes, seeds, settings) with statistics a reader can
//! trust.
//!
//! - [`stats`]: means over seeds with exact (or fixed-seed) bootstrap intervals, paired
//!   differences against a baseline arm, and the mean height of an evaluation curve.

pub mod stats;
