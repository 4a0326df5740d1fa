use dispatcher::prelude::*;

// The answer used after the misplaced macro: the error is the only message
// (no "unreachable call" or "unreachable expression" beside it).
async fn helper(question: &str) -> Result<String, RequestError> {
    let answer = yield_request!(Request::chat().user(question))?;
    Ok(answer.text().to_string())
}

#[task]
async fn ask(input: String) -> Result<String, TaskError> {
    Ok(helper(&input).await?)
}

fn main() {}
