// Placeholder replaced by the rq bench.
fn main() {}
