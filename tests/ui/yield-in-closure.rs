use dispatcher::{task, Request, TaskError};

#[task]
async fn inside(input: Vec<String>) -> Result<usize, TaskError> {
    let sizes: Vec<usize> = input
        .iter()
        .map(|p| yield_request!(Request::chat().user(p)).map(|r| r.text().len()).unwrap_or(0))
        .collect();
    Ok(sizes.len())
}

fn main() {}
