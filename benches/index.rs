// Placeholder replaced by the index bench.
fn main() {}
