use dispatcher::prelude::*;

async fn helper(question: &str) -> Result<Response, RequestError> {
    yield_request!(Request::chat().user(question))
}

#[task]
async fn ask(input: String) -> Result<String, TaskError> {
    Ok(helper(&input).await?.text().to_string())
}

fn main() {}
