# Builds and runs tests/cmake/consumer against polyattn, either installed to a temporary
# prefix and found with find_package (MODE=find_package) or through add_subdirectory.
cmake_minimum_required(VERSION 3.21)
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()

set(args -S ${POLYATTN_SOURCE_DIR}/tests/cmake/consumer -B ${WORK_DIR}/build -DCMAKE_BUILD_TYPE=Release
         -DCMAKE_CXX_COMPILER=${CXX_COMPILER})
if(MODE STREQUAL "find_package")
  run(${CMAKE_COMMAND} --install ${POLYATTN_BINARY_DIR} --prefix ${WORK_DIR}/prefix)
  if(NOT EXISTS ${WORK_DIR}/prefix/share/cmake/polyattn/polyattnConfig.cmake)
    message(FATAL_ERROR "install did not produce polyattnConfig.cmake")
  endif()
  run(${CMAKE_COMMAND} ${args} -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix -DPOLYATTN_CONSUMER_MODE=find_package)
elseif(MODE STREQUAL "add_subdirectory")
  run(${CMAKE_COMMAND} ${args} -DPOLYATTN_CONSUMER_MODE=add_subdirectory -DPOLYATTN_SOURCE_DIR=${POLYATTN_SOURCE_DIR})
else()
  message(FATAL_ERROR "unknown MODE '${MODE}'")
endif()
run(${CMAKE_COMMAND} --build ${WORK_DIR}/build -j 2)
run(${WORK_DIR}/build/consumer)
