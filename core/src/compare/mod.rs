//! Comparing training arms (credit schemes, seeds, settings) with statistics a reader can
//! trust.
//!
//! - [`sweep`]: a base run, arms and a grid crossed with seeds, at equal compute.
//! - [`stats`]: means over seeds with exact (or fixed-seed) bootstrap intervals, paired
//!   differences against a baseline arm, and the mean height of an evaluation curve.
//! - [`report`]: per arm and evaluation step, the estimates; a markdown table.

pub mod report;
pub mod stats;
pub mod sweep;
