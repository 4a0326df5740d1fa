//! The names people give tasks are the names they give variables: a local
//! binding of a task's name, in another task or anywhere else, shadows the
//! task instead of failing to compile, and the task is still the task where
//! its name is not shadowed.
#![deny(warnings)]

use dispatcher::prelude::*;
use dispatcher::{DynTask, Task};

#[task]
async fn answer(input: String) -> Result<String, TaskError> {
    let response = yield_request!(Request::chat().user(&input))?;
    let judge = response.text().to_string();
    Ok(judge)
}

#[task]
async fn judge(input: String) -> Result<String, TaskError> {
    let answer = yield_request!(Request::chat().user(&input))?;
    let [response, judge] = yield_request!([
        Request::chat().user(answer.text()),
        Request::chat().user(&input),
    ])?;
    Ok(format!("{} {}", response.text(), judge.text()))
}

#[task]
async fn response(input: String, ctx: TaskContext) -> Result<usize, TaskError> {
    let answer = ctx.work_id() as usize;
    let response = yield_request!(Request::completion(input))?.text().len();
    Ok(answer + response)
}

fn main() {
    let tasks: [&'static dyn DynTask; 3] = [&answer, &judge, &response];
    let names: Vec<&str> = tasks.iter().map(|t| t.name()).collect();
    assert_eq!(names, ["answer", "judge", "response"]);
    // The type keeps the name too.
    assert_eq!(<judge as Task>::NAME, "judge");
    let answer = 42;
    let judge = "shadowed";
    assert_eq!((answer, judge), (42, "shadowed"));
    assert_eq!(DynTask::name(&response), "response");
}
