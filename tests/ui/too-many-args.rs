use dispatcher::{task, TaskContext, TaskError};

#[task]
async fn three(input: String, ctx: TaskContext, extra: u32) -> Result<String, TaskError> {
    Ok(input)
}

fn main() {}
