use dispatcher::{task, Request, TaskError};

#[task]
async fn pair(input: String) -> Result<String, TaskError> {
    let both = yield_request!(Request::chat().user(&input), Request::chat().user("again"))?;
    Ok(both.text().to_string())
}

fn main() {}
