use dispatcher::prelude::*;

#[derive(serde::Deserialize)]
struct In {
    prompt: String,
}

#[task]
async fn plain(input: In) -> String {
    let response = yield_request!(Request::chat().user(&input.prompt))?;
    let n: u32 = response.text().parse().or_fail("not_a_number")?;
    if n == 0 {
        return Err(TaskError::failed("zero", "the model said 0"));
    }
    Ok(n.to_string())
}

fn main() {
    let _ = dispatcher::run_tasks(&[&plain]);
}
