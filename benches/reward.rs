// Placeholder replaced by the reward bench.
fn main() {}
