use dispatcher::prelude::*;

#[task]
async fn shout(input: String, ctx: &TaskContext) -> Result<String, TaskError> {
    Ok(format!("{} {}", ctx.work_id(), input.to_uppercase()))
}

fn main() {}
