use dispatcher::{task, Request, TaskError};

#[task]
async fn later(input: String) -> Result<String, TaskError> {
    let fut = async { yield_request!(Request::chat().user(&input)) };
    Ok(fut.await?.text().to_string())
}

fn main() {}
