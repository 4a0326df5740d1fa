use dispatcher::{yield_request, Request};

async fn not_a_task() {
    let _ = yield_request!(Request::chat().user("hi"));
}

fn main() {}
