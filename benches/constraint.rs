// Placeholder replaced by the constraint bench.
fn main() {}
