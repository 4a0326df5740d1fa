use dispatcher::prelude::*;

#[task]
async fn nothing(input: String) {
    let response = yield_request!(Request::chat().user(input))?;
    Ok(response.text().to_string())
}

fn main() {}
